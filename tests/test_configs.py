"""Config structure: every task has a `trainer:` node, and `debug=tiny` serves train and
pretrain alike."""

import pytest
from omegaconf import OmegaConf

from regionnet.config import compose_config
from regionnet.predict import predict_trainer_config


def test_predict_has_a_trainer_node_that_the_short_keys_feed():
    cfg = compose_config("predict", ["ckpt_path=x.ckpt", "input=y", "precision=bf16-mixed"])
    assert predict_trainer_config(cfg) == {
        "accelerator": "auto",
        "devices": 1,
        "precision": "bf16-mixed",
    }
    cfg = compose_config("predict", ["ckpt_path=x", "input=y", "trainer.accelerator=cpu"])
    assert predict_trainer_config(cfg)["accelerator"] == "cpu"
    with pytest.raises(ValueError, match="trainer.devices=1"):
        predict_trainer_config(
            compose_config("predict", ["ckpt_path=x", "input=y", "trainer.devices=2"])
        )


def test_eval_has_a_trainer_node():
    cfg = compose_config("eval", ["ckpt_path=x.ckpt"])
    assert OmegaConf.to_container(cfg.trainer)["devices"] == 1


@pytest.mark.parametrize("task", ["train", "pretrain"])
def test_debug_tiny_composes_for_train_and_pretrain(task, tmp_path):
    cfg = compose_config(task, ["debug=tiny", f"paths.output_dir={tmp_path}"])
    assert cfg.data.image_size == 32 and cfg.trainer.max_epochs == 1
    assert cfg.trainer.accelerator == "cpu" and not cfg.model.pretrained
    assert "csv" in cfg.logger and "wandb" not in cfg.logger
    # a command-line value still wins over the preset
    cfg = compose_config(task, ["debug=tiny", "trainer.max_epochs=3", "logger=none"])
    assert cfg.trainer.max_epochs == 3 and not cfg.get("logger")


def test_pretrain_keeps_its_own_trainer_settings():
    """pretrain.yaml's trainer values (20 epochs, no validation: nothing is labelled) win over
    trainer/default.yaml's; they were silently replaced by its 10 epochs and validation on."""
    cfg = compose_config("pretrain", [])
    assert cfg.trainer.max_epochs == 20
    assert cfg.trainer.limit_val_batches == 0 and cfg.trainer.num_sanity_val_steps == 0
    assert compose_config("pretrain", ["trainer.max_epochs=3"]).trainer.max_epochs == 3


def test_dict_valued_keys_take_a_dict_from_the_command_line(tmp_path):
    """`data.aliases={wrist: hand}` (the form the config's comment gives) composes and maps a
    wrist folder to the hand head; a `{}` default would refuse the new key as not in struct."""
    from PIL import Image

    from regionnet.run import build_datamodule

    for folder in ("wrist", "knee"):
        (tmp_path / folder).mkdir()
        for i in range(10):
            Image.new("L", (8, 8), 20 * i).save(tmp_path / folder / f"{i}.png")
    cfg = compose_config(
        "train",
        ["data=folder", f"data.root={tmp_path}", "data.aliases={wrist: hand}"]
        + [f"paths.output_dir={tmp_path / 'run'}"],
    )
    dm = build_datamodule(cfg)
    dm.setup()
    assert sorted(set(dm.records["region"])) == ["hand", "knee"]

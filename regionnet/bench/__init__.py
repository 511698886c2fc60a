"""regionnet benchmarks on real radiographs and this machine (scripts/benchmark.py runs them).

    from regionnet.bench import BenchSettings
    from regionnet.bench.run import run_benchmark
    run_benchmark(BenchSettings(data_dir, out_dir, precision="32-true", skip=frozenset({"ssl"})))

Modules, by what they hold:
  settings     BenchSettings (every setting of a run, one frozen dataclass), FineTune, log
  run          run_benchmark: the sections, --merge, results.json and RESULTS.md
  protocol     train + evaluate + break down one configuration (accuracy, ssl, transfer)
  accuracy     the study's protocol (experiment=yi2019) on ../shared/data
  speed        model-only throughput (torch.utils.benchmark.Timer), roofline, cost curves,
               end-to-end regionnet-predict
  backbones    a Hydra multirun over timm backbones
  ssl          regionnet-pretrain, then fine-tunes from its backbone
  transfer     scratch vs ImageNet vs ImageNet + recipe; calibration, cam_errors and hands
               hold its calibration, Grad-CAM of the worst errors and hand-across-sources parts
  report       RESULTS.md; paths: absolute paths made relative for committed reports
"""

from regionnet.bench.settings import SECTIONS, BenchSettings, FineTune

__all__ = ["SECTIONS", "BenchSettings", "FineTune"]

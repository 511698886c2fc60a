"""The package's shape: no import circles between regionnet's modules (function-level imports
included), so every module can be read and tested from the bottom up."""

import ast
from pathlib import Path

import regionnet

PACKAGE = Path(regionnet.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """regionnet module -> the regionnet modules it imports anywhere in its file."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                for alias in node.names:  # `from regionnet.model import net` imports a module
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in modules else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_cycle_finder_sees_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    assert "regionnet.run" in graph["regionnet.train"]  # the graph sees real imports
    assert cycles(graph) == []


def test_every_head_type_runs_on_the_one_loop():
    """Region, landmark and box models are HeadLoops: the steps, logging, best tracking and
    optimizer live in `regionnet.model.loop` only, so a head type cannot grow a second copy
    of the training loop."""
    from regionnet.boxes.module import BoxNet
    from regionnet.landmarks.module import LandmarkNet
    from regionnet.model.loop import HeadLoop
    from regionnet.model.module import RegionNet

    loop = ("training_step", "validation_step", "test_step", "predict_step",
            "on_validation_epoch_end", "on_test_epoch_end", "configure_optimizers")  # fmt: skip
    hooks = ("training_loss", "update_metrics", "end_stage", "predict_batch",
             "empty_prediction", "reset_metrics", "head_parameters")  # fmt: skip
    for cls in (RegionNet, LandmarkNet, BoxNet):
        assert issubclass(cls, HeadLoop)
        assert not [m for m in loop if m in vars(cls)], f"{cls.__name__} copies the loop"
        assert all(m in vars(cls) for m in hooks), f"{cls.__name__} misses a head-type hook"
    assert {RegionNet.task, LandmarkNet.task, BoxNet.task} == {"regions", "landmarks", "boxes"}

"""The layout DESIGN.md asks for: flat files whose imports point one way, down the layers, and lines a reader
can take in (STYLE.md: at most 120 characters).

    pytest tests/test_layout.py
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# each file may import only those before it (DESIGN.md: layers <- encoders, resampler <- apollo <- train <- sweep;
# sampling <- data <- train, bench; integrate <- apollo); a new file takes its place here
ORDER = ["layers", "integrate", "sampling", "scene", "questions", "data", "encoders", "resampler", "apollo", "samples",
         "config", "evaluate", "train", "apollobench", "bench", "probe", "report", "sweep", "speed"]


def project_imports(path):
    """The project's modules a file imports, anywhere in it (a function's import counts as much as the top's)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found & set(ORDER)


def test_imports_point_down_the_layers():
    files = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
    assert sorted(ORDER) == files, "every file of the core has its place in ORDER"
    upward = {m: sorted(project_imports(os.path.join(ROOT, m + ".py")) - set(ORDER[:ORDER.index(m)]))
              for m in ORDER}
    assert not any(upward.values()), {m: up for m, up in upward.items() if up}


def test_lines_at_most_120_characters():
    paths = [os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")]
    paths += [os.path.join(ROOT, "tests", f) for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")]
    long = [f"{os.path.relpath(p, ROOT)}:{i}" for p in sorted(paths)
            for i, line in enumerate(open(p, encoding="utf-8").read().split("\n"), 1) if len(line) > 120]
    assert not long, long

"""Our own packaging (TESTING.md §10, STYLE.md §4.10): entry points, import structure,
import-light modules, docstrings of the public API, and a real install of a third-party
backend distribution (``slow``)."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import moe_core
from moe_core import plugins

ROOT = Path(__file__).resolve().parents[1]


def entry_points(group: str) -> dict[str, str]:
    """The installed metadata's entry points of ``group`` (name -> value)."""
    dist = importlib.metadata.distribution("moe-core")
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == group}


def declared(group: str) -> dict[str, str]:
    """The entry points ``setup.cfg`` declares for ``group`` (name -> value)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    text = cfg.get("options.entry_points", group, fallback="")
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in text.splitlines() if "=" in line)}


def test_distribution_declares_the_entry_points() -> None:
    backends = entry_points(plugins.BACKENDS_GROUP)
    assert backends["torch"] == "moe_core.reference:TorchBackend"
    assert backends["cuda"] == "moe_core.backends.cuda:CudaBackend"
    assert entry_points(plugins.HOOKS_GROUP)["filter_expert"] == "moe_core.hooks.filter_expert"
    assert entry_points("console_scripts")["moe-core"] == "moe_core.cli:main"
    # the registry sees exactly these, from this distribution, and every one loads
    ours = {i.name: i for i in plugins.load_report() if i.distribution == "moe-core"}
    assert {n for n, i in ours.items() if i.group == plugins.BACKENDS_GROUP} == set(backends)
    assert all(i.state == "loaded" for i in ours.values()), [i.describe() for i in ours.values()]


@pytest.mark.parametrize("group", [plugins.BACKENDS_GROUP, plugins.HOOKS_GROUP, "pytest11", "console_scripts"])
def test_installed_metadata_matches_setup_cfg(group: str) -> None:
    assert entry_points(group) == declared(group), \
        f"installed entry points of {group} differ from setup.cfg: re-run `pip install -e .`"


def test_every_in_tree_plugin_has_an_entry_point() -> None:
    backends = {value.split(":")[0] for value in declared(plugins.BACKENDS_GROUP).values()}
    hooks = {value.split(":")[0] for value in declared(plugins.HOOKS_GROUP).values()}
    folders = sorted(p.name for p in (ROOT / "backends").iterdir() if (p / "__init__.py").exists())
    modules = sorted(p.stem for p in (ROOT / "hooks").glob("*.py") if p.stem != "__init__")
    assert folders and modules
    missing = [f"backends/{f}/" for f in folders if f"moe_core.backends.{f}" not in backends]
    missing += [f"hooks/{m}.py" for m in modules if f"moe_core.hooks.{m}" not in hooks]
    assert not missing, f"no entry point in setup.cfg for {missing}"


def _imports(source: str, package: str) -> list[tuple[int, str]]:
    """Every module ``source`` (a module of ``package``) imports: absolute names, relative
    imports resolved, ``importlib.import_module("...")`` calls included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) ==
              "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value)))
    return sorted(found)


def _crosses(name: str) -> bool:
    return name.split(".")[:2] in (["moe_core", "backends"], ["moe_core", "hooks"])


def test_core_never_imports_backends_or_hooks() -> None:
    bad = []
    for path in sorted((ROOT / "moe_core").rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).parts[:-1])
        bad += [f"{path.relative_to(ROOT)}:{line}: {name}"
                for line, name in _imports(path.read_text(), package) if _crosses(name)]
    assert not bad, ("moe_core/ must not import from backends/ or hooks/ (type-only imports under "
                     "TYPE_CHECKING included: describe the type in moe_core, e.g. a Protocol):\n" + "\n".join(bad))


def test_the_import_scan_sees_every_form() -> None:
    source = textwrap.dedent("""
        import moe_core.backends.cuda
        from moe_core.hooks import filter_expert
        from moe_core import backends
        from ..hooks import lora
        importlib.import_module("moe_core.backends.hip")
        from moe_core import hookspecs
        """)
    names = [n for _, n in _imports(source, "moe_core.testing")]
    assert names == ["moe_core.backends.cuda", "moe_core.hooks.filter_expert", "moe_core.backends",
                     "moe_core.hooks.lora", "moe_core.backends.hip", "moe_core.hookspecs"]
    assert [_crosses(n) for n in names] == [True] * 5 + [False]


def test_import_is_light() -> None:
    script = textwrap.dedent("""
        import json, sys
        import moe_core
        print(json.dumps(sorted(sys.modules)))
        moe_core.list_backends()
        print(json.dumps(sorted(sys.modules)))
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_CORE_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    after_import, after_load = (json.loads(line) for line in done.stdout.splitlines()[-2:])

    def under(module: str, *packages: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in packages)

    heavy = [m for m in after_import if under(m, "triton", "moe_core.kernels", "moe_core.backends", "moe_core.hooks")]
    assert not heavy, f"`import moe_core` imported {heavy}; import them lazily (STYLE.md §2)"
    # loading every entry point describes the backends without importing Triton or a kernel
    assert "moe_core.backends.cuda" in after_load
    heavy = [m for m in after_load if under(m, "triton") or m.startswith("moe_core.kernels._")]
    assert not heavy, f"loading the entry points imported {heavy}; entry-point modules must be import-light"


def _has_doc_comment(name: str) -> bool:
    """A non-callable public value is documented by a ``#:`` comment above its assignment."""
    for path in (ROOT / "moe_core").rglob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith((f"{name} =", f"{name}: ")) and i and lines[i - 1].startswith("#:"):
                return True
    return False


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for name in moe_core.__all__:
        obj = getattr(moe_core, name)
        if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj):
            if not (obj.__doc__ or "").strip():
                missing.append(name)
        elif not _has_doc_comment(name):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if not attr.startswith("_") and inspect.isfunction(func) and not (func.__doc__ or "").strip():
                    missing.append(f"{name}.{attr}")
    assert not missing, f"public names without a docstring: {missing}"


def test_console_script_lists_backends() -> None:
    script = Path(sys.executable).with_name("moe-core")
    assert script.exists(), "console script moe-core is not installed; run `pip install -e .`"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_CORE_")}
    done = subprocess.run([str(script), "backends"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch" in done.stdout and "filter_expert" in done.stdout


@pytest.mark.slow
def test_real_install_of_a_third_party_backend(tmp_path: Path) -> None:
    """``pip install`` a separate distribution into a fresh venv; discovery finds it in a
    new process, a broken sibling is reported with its cause and stops nothing."""
    if importlib.util.find_spec("setuptools") is None:     # Python >= 3.12 venvs come without it
        pytest.skip("needs setuptools in this environment to build tests/fake_plugin without network")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    # --system-site-packages exposes the base interpreter's packages; expose ours (moe-core,
    # torch, setuptools) the same way: a .pth adding our site dirs (their .pth files included)
    target = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(target) / "_outer_env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in ours) + "\n")
    source = tmp_path / "fake_plugin"                  # build a copy: keep the tree clean
    shutil.copytree(ROOT / "tests" / "fake_plugin", source)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-cache-dir", "--no-build-isolation", "--no-index", str(source)],
                   check=True, timeout=300, capture_output=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_CORE_")}

    def moe_core_cli(*argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(python), "-m", "moe_core", *argv], capture_output=True, text=True,
                              env={**env, **extra}, timeout=300, cwd=tmp_path)

    listing = moe_core_cli("backends")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines() if line.strip()}
    assert "yes" in rows["fake"] and "moe-core-fake 0.3.1" in rows["fake"]
    assert "failed" in rows["fake_broken"] and "yes" in rows["torch"]
    assert "moe_core_fake_vendor_runtime" in listing.stdout        # the cause, with its traceback

    select = textwrap.dedent("""
        import torch, moe_core
        from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for
        g = torch.Generator().manual_seed(0)
        x, w1, w2 = torch.randn(3, 8, generator=g), torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 4, generator=g)
        tw, ids = torch.rand(3, 2, generator=g), torch.tensor([[0, 1], [2, 3], [3, 0]], dtype=torch.int32)
        runner = moe_core.MoERunner(moe_core.MoELayer(num_local_experts=4, top_k=2, hidden_size=8, intermediate_size=4))
        out = runner.run(x, moe_core.ExpertWeights(w1, w2), tw, ids)
        assert_close_normalized(out, oracle_moe(x, w1, w2, tw, ids), *tolerance_for(torch.float32))
        print(runner.explain().splitlines()[0])
        """)
    chosen = subprocess.run([str(python), "-c", select], capture_output=True, text=True, timeout=300,
                            env={**env, "MOE_CORE_BACKEND": "fake"}, cwd=tmp_path)
    assert chosen.returncode == 0, chosen.stdout + chosen.stderr
    assert "backend: fake (platform fake, priority -1, distribution moe-core-fake 0.3.1)" in chosen.stdout

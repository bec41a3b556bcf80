"""The install (issue 15): `import dspark` refuses a build made for another torch, and says so when
the source tree shadows the installed package; the native module's Python side (pybind11) says
what the build contains."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dspark
from dspark import _C
from dspark._install import torch_mismatch

INSTALLED = os.path.dirname(dspark.__file__)


@pytest.mark.parametrize("built,built_cuda,running,running_cuda,with_cuda,ok", [
    ("2.14.1+cu130", "13.0", "2.14.1+cu130", "13.0", True, True),
    ("2.14.0+cu130", "13.0", "2.14.1+cu130", "13.0", True, True),  # patch releases share the ABI
    ("2.14.1+cu130", "13.0", "2.14.1+cu132", "13.2", True, True),  # CUDA minor: same runtime
    ("2.15.0+cu132", "13.2", "2.14.1+cu130", "13.0", True, False),  # the case
    ("2.14.1+cu126", "12.6", "2.14.1+cu130", "13.0", True, False),  # CUDA major
    ("2.14.1+cu130", "13.0", "2.14.1+cpu", None, True, False),  # CUDA kernels, CPU-only torch
    ("2.14.1+cu130", "13.0", "2.14.1+cpu", None, False, True),  # a CPU-only build loads anywhere
    ("2.14.1+cpu", "", "2.14.1+cu130", "13.0", False, True),
    ("2.13.0+cpu", "", "2.14.1+cu130", "13.0", False, False),
    ("2.14.1", "13.0", "3.14.1", "13.0", True, False),
])
def test_torch_mismatch(built, built_cuda, running, running_cuda, with_cuda, ok):
    msg = torch_mismatch(built, built_cuda, running, running_cuda, with_cuda)
    assert (msg is None) == ok, msg
    if not ok:
        assert built in msg and running in msg and len(msg.splitlines()) == 1
        assert "pip install --no-build-isolation" in msg and "--force-reinstall" in msg


def fake_package(tmp_path, **build_info) -> str:
    """A copy of the installed package with its recorded build facts changed; returns the dir
    to put on PYTHONPATH."""
    root = tmp_path / "site"
    shutil.copytree(INSTALLED, root / "dspark", ignore=shutil.ignore_patterns("__pycache__"))
    file = root / "dspark" / "_build_info.py"
    text = file.read_text()
    for key, value in build_info.items():
        text = "\n".join(f"{key} = {value!r}" if line.startswith(f"{key} =") else line
                         for line in text.splitlines())
    file.write_text(text + "\n")
    return str(root)


def run_python(code: str, path: str, cwd: str, argv0: str = "-c", flags=()):
    env = dict(os.environ, PYTHONPATH=path)
    prog = f"import sys; sys.argv[0] = {argv0!r}; {code}"
    return subprocess.run([sys.executable, *flags, "-c", prog], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_refuses_a_build_for_another_torch(tmp_path):
    path = fake_package(tmp_path, TORCH_VERSION="2.0.1+cu118", TORCH_CUDA="11.8")
    r = run_python("import dspark", path, str(tmp_path))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: dspark was built against torch 2.0.1+cu118"), r.stderr
    assert torch.__version__ in last and "--no-build-isolation" in last
    # the `dspark` command: one line, exit code 2, no traceback
    r = run_python("import dspark", path, str(tmp_path), argv0="/usr/bin/dspark")
    assert r.returncode == 2 and r.stderr.startswith("dspark: error: dspark was built against")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_import_accepts_the_recorded_build(tmp_path):
    path = fake_package(tmp_path)
    r = run_python("import dspark; print(dspark.__file__)", path, str(tmp_path))
    assert r.returncode == 0 and r.stdout.startswith(path), r.stderr


def test_source_tree_shadowing_the_installed_package_is_named(tmp_path):
    """Python started in the repository root imports the unbuilt source tree: the error says
    that, and where the installed dspark is."""
    src = tmp_path / "repo"
    shutil.copytree(INSTALLED, src / "dspark",
                    ignore=shutil.ignore_patterns("__pycache__", "_C*", "_build_info.py"))
    (src / "CMakeLists.txt").write_text("project(dspark)\n")
    r = run_python("import dspark", os.path.dirname(INSTALLED), str(src))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "source tree" in last and str(src / "dspark") in last, r.stderr
    assert INSTALLED in last and "another directory" in last, r.stderr
    r = run_python("import dspark", "", str(src), flags=["-S"])  # no site-packages: no install
    assert "is dspark's source tree and is not built" in r.stderr.strip().splitlines()[-1]


def test_native_module_facts():
    """csrc/module.cpp (pybind11): build facts match the recorded build info."""
    facts = _C.build_facts()
    info = dspark.build_info()
    assert facts["with_cuda"] == info["cuda_kernels"] == _C.cuda_enabled()
    assert facts["torch_version"] == dspark.TORCH_VERSION.split("+")[0]
    if facts["with_cuda"]:
        assert facts["cuda_archs"] == info["cuda_archs"].replace(";", ",")
        assert info["cuda_runtime"] == facts["cuda_runtime"]
    assert info["devices"] == [] or all("kernel_ptx_arch" in d for d in info["devices"])
    before = _C.set_sync_checks(False)
    assert _C.set_sync_checks(before) is False
    with pytest.raises(TypeError):
        _C.set_sync_checks("yes")
    if not torch.cuda.is_available():
        with pytest.raises(Exception):
            _C.device_properties(0)


@pytest.mark.cuda
def test_device_properties_on_gpu():
    if not dspark.cuda_available():
        pytest.skip("needs a CUDA build of dspark and a visible GPU")
    d = _C.device_properties(0)
    assert d["capability"] == torch.cuda.get_device_capability(0)
    assert d["sm90_paths"] == (d["capability"][0] >= 9 and d["kernel_ptx_arch"] >= 90)
    with pytest.raises(ValueError, match="device index"):
        _C.device_properties(torch.cuda.device_count())


# ---- the build backend (build_backend/dspark_build.py) -----------------------------------------
def load_backend(monkeypatch, tmp_path, torch_visible: bool, torch_in_site: bool):
    """The backend module as pip would import it, in an environment where `import torch` works
    or not (pip's isolated build hides site-packages) and the site dir holds torch or not."""
    import importlib.util
    import sysconfig
    path = os.path.join(os.path.dirname(__file__), "..", "build_backend", "dspark_build.py")
    spec = importlib.util.spec_from_file_location("dspark_build_under_test", path)
    backend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(backend)
    site = tmp_path / "site-packages"
    (site / ("torch" if torch_in_site else "other")).mkdir(parents=True)
    if torch_in_site:
        (site / "torch" / "__init__.py").write_text("")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        find_spec(name, *a) if name != "torch" or torch_visible else None))
    monkeypatch.setattr(sysconfig, "get_path", lambda key, *a: str(site))
    monkeypatch.setenv("DSPARK_TORCH_SITE", "")  # unset for the backend, restored afterwards
    return backend, str(site)


def test_backend_builds_against_the_torch_it_finds(monkeypatch, tmp_path):
    backend, _ = load_backend(monkeypatch, tmp_path, torch_visible=True, torch_in_site=False)
    backend._prepare()  # `import torch` works (no isolation): CMake asks that interpreter
    assert not os.environ["DSPARK_TORCH_SITE"]
    backend, site = load_backend(monkeypatch, tmp_path / "iso", torch_visible=False,
                                 torch_in_site=True)
    backend._prepare()  # isolated build: torch found in the hidden site-packages
    assert os.environ["DSPARK_TORCH_SITE"] == site


@pytest.mark.parametrize("case", ["no torch", "no scikit-build-core"])
def test_backend_says_what_to_install_in_one_line(monkeypatch, tmp_path, case):
    backend, _ = load_backend(monkeypatch, tmp_path, torch_visible=False, torch_in_site=False)
    if case == "no scikit-build-core":
        monkeypatch.setattr(backend, "_backend", None)
    with pytest.raises(SystemExit) as err:
        backend._prepare()
    msg = str(err.value)
    assert msg.startswith("dspark build: ") and len(msg.splitlines()) == 1, msg
    assert ("install torch first" if case == "no torch" else "pip install 'scikit-build-core") \
        in msg, msg

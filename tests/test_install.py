"""One import root: the project installs as `lasp` (lasp.kernels, lasp.models, ...), never as a top-level `kernels`,
so it lives beside Hugging Face's `kernels` (required by transformers >= 5) in one environment, in either order."""
import os
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = ("import kernels, transformers, lasp.kernels as ours; from lasp.kernels import lightning_attn; "
         "assert 'site-packages' in kernels.__file__ and hasattr(kernels, 'get_kernel'), kernels.__file__; "
         "assert ours.__file__ != kernels.__file__; print(ours.__file__)")


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env


def test_editable_install_beside_hf_kernels_from_an_empty_folder(tmp_path):
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=_clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith(os.path.join("kernels", "__init__.py"))


def test_wheel_install_puts_every_folder_under_lasp(tmp_path):
    # an isolated build (pip's default): with --no-build-isolation and HF's kernels installed, setuptools loads
    # kernels' egg_info plugin while the source tree's kernels/ folder is first on sys.path (docs/launch.md)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    py = str(env_dir / "bin" / "python")
    build = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", ROOT], env=_clean_env(), capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, env=_clean_env()).stdout.strip()
    top = sorted(os.listdir(site))
    assert "lasp" in top and not {"parallel", "models", "launch"} & set(top), top
    assert not os.path.exists(os.path.join(site, "kernels")), "installed a top-level kernels/"
    for sub in ("kernels", "parallel", "models", "launch"):
        assert os.path.isfile(os.path.join(site, "lasp", sub, "__init__.py")), sub
    assert os.path.isfile(os.path.join(site, "lasp", "launch", "configs", "default.toml"))
    out = subprocess.run([py, "-c", CHECK], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(site), (out.stdout, site)   # the wheel's copy, not the checkout


@pytest.mark.parametrize("module", ["lasp.launch.evaluate", "lasp.launch.generate", "lasp.kernels.bench"])
def test_entry_points_run_from_any_folder(tmp_path, module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr[-2000:]


def test_repository_root_on_sys_path_does_not_shadow_hf_kernels():
    # python started in the repository root puts it first on sys.path, where our kernels/ folder lies
    code = "import lasp; import transformers.activations, kernels; assert 'site-packages' in kernels.__file__"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_transformers_imports_inside_the_test_process():
    assert os.path.realpath(ROOT) in {os.path.realpath(p or ".") for p in sys.path}   # pytest put the root there
    import kernels
    from transformers.activations import ACT2FN  # noqa: F401  imports HF kernels' hub integration
    assert "site-packages" in kernels.__file__

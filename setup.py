"""Builds the p2pcheck wheel: `cargo build --release`, then the shared library, the worker and
the CLI copied into the package (python/p2pcheck/_bin/), so that nothing of Rust is needed
where the wheel is installed. The metadata is in pyproject.toml.

Where the artifacts come from is said once, in CARGO_ARGS and ARTIFACTS below (should the C
ABI's library be renamed again, only they change). P2PCHECK_PREBUILT=DIR takes the three files
from DIR instead of running cargo (CI builds them once); CARGO_TARGET_DIR is honoured.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = os.path.dirname(os.path.abspath(__file__))

# The one place that says how the artifacts are built and where cargo puts them (relative to
# the target directory's release/ folder), and their names in the package's _bin/ folder.
CARGO_ARGS = [
    "build", "--release", "--workspace", "--lib", "--bin", "p2pcheck", "--bin", "p2pcheck-worker"
]
ARTIFACTS = {
    # The C ABI is the crate capi/ (p2pcheck-capi): cargo names its library after it.
    "libp2pcheck.so": "libp2pcheck_capi.so",
    "p2pcheck-worker": "p2pcheck-worker",
    "p2pcheck": "p2pcheck",
}
EXECUTABLES = {"p2pcheck-worker", "p2pcheck"}


def built_artifacts_dir():
    """The folder holding the three artifacts: $P2PCHECK_PREBUILT, else cargo's release/ after
    a cargo build."""
    prebuilt = os.environ.get("P2PCHECK_PREBUILT")
    if prebuilt:
        return prebuilt
    cargo = os.environ.get("CARGO", "cargo")
    try:
        subprocess.run([cargo] + CARGO_ARGS, cwd=ROOT, check=True)
    except FileNotFoundError:
        sys.exit(
            "p2pcheck: building the wheel needs cargo (Rust 1.79 or newer, https://rustup.rs), "
            "or P2PCHECK_PREBUILT=DIR with libp2pcheck_capi.so, p2pcheck-worker and p2pcheck in DIR"
        )
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.path.join(target, "release")


class BuildWithCargo(build_py):
    """build_py, plus the cargo artifacts copied into p2pcheck/_bin/ of the build folder."""

    def run(self):
        super().run()
        source = built_artifacts_dir()
        dest = os.path.join(self.build_lib, "p2pcheck", "_bin")
        os.makedirs(dest, exist_ok=True)
        for name, built in ARTIFACTS.items():
            path = os.path.join(source, built)
            if not os.path.isfile(path):
                sys.exit(f"p2pcheck: {path} was not built")
            target = os.path.join(dest, name)
            shutil.copyfile(path, target)
            os.chmod(target, 0o755 if name in EXECUTABLES else 0o644)


class PlatformWheel(bdist_wheel):
    """A wheel for this platform (the binaries are native) usable by any Python 3 (ctypes: no
    extension module): py3-none-linux_x86_64."""

    def finalize_options(self):
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):
        plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
        return "py3", "none", plat


class BinaryDistribution(Distribution):
    """Holds native code, though no extension module."""

    def has_ext_modules(self):
        return True


setup(
    cmdclass={"build_py": BuildWithCargo, "bdist_wheel": PlatformWheel},
    distclass=BinaryDistribution,
)

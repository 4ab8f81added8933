"""Running the CLI as an unprivileged user (``setpriv --reuid=nobody``) wherever the clone lives.

The clone (and the venv, and even the interpreter) may sit under a directory only root can enter, such as
``/root/project`` (mode 700 on Debian): then ``PYTHONPATH=<clone>`` gives nobody ``No module named 'agent'``.
``NobodyPython`` copies the package and the third-party modules the CLI imports into a world-readable temporary
directory and picks an interpreter that nobody can execute."""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
MODULES = ("dbus_next", "yaml", "_yaml", "defusedxml")  # what `omaha-agent` needs before any network use


def _origin(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    return os.path.dirname(spec.origin) if spec.submodule_search_locations else spec.origin


class NobodyPython:
    def __init__(self, source_root: str):
        self.dir = tempfile.mkdtemp(prefix="omaha-nobody-")
        os.chmod(self.dir, 0o755)
        shutil.copytree(os.path.join(source_root, "agent"), os.path.join(self.dir, "agent"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for name in MODULES:
            origin = _origin(name)
            if origin is None:
                continue
            target = os.path.join(self.dir, os.path.basename(origin))
            if os.path.isdir(origin):
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, target)
        for root, dirs, files in os.walk(self.dir):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        self.env = dict(os.environ, PYTHONPATH=self.dir)
        self.python = self._interpreter()

    def _interpreter(self) -> str:
        for candidate in (sys.executable, os.path.realpath(sys.executable), shutil.which("python3") or "",
                          "/usr/bin/python3"):
            if not candidate:
                continue
            probe = subprocess.run([*AS_NOBODY, candidate, "-c", "import agent.cli, yaml, dbus_next"],
                                   capture_output=True, env=self.env, cwd=self.dir, timeout=60)
            if probe.returncode == 0:
                return candidate
        raise RuntimeError("no Python interpreter that user nobody can run and import the agent with")

    def argv(self, *args: str) -> list[str]:
        return [*AS_NOBODY, self.python, "-m", "agent.cli", *args]

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

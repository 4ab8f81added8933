"""The Debian package as ``make deb`` builds it from debian/ with debhelper and dh-python: its files, conffile,
dependencies and maintainer scripts read back with dpkg-deb, lintian's verdict, and two builds giving the same
bytes. Each build is a real dpkg-buildpackage run (a few seconds)."""
import os
import re
import shutil
import subprocess
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_PACKAGES = ("debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-all", "python3-setuptools",
                  "python3-wheel", "dpkg-dev", "lintian")
DEPENDS = ("python3-aiohttp", "python3-defusedxml", "python3-yaml", "python3-dbus-next", "python3-pyudev",
           "python3-cryptography")


def version() -> str:
    with open(os.path.join(ROOT, "debian", "changelog")) as f:
        return re.match(r"omaha-agent \(([^)]+)\)", f.readline()).group(1)


def source_date_epoch() -> str:
    """The commit's time, so two builds of one commit share every timestamp (the changelog's date without git)."""
    done = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip()
    done = subprocess.run(["dpkg-parsechangelog", "-l", "debian/changelog", "-S", "Timestamp"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def build(out) -> str:
    """``make deb-package`` into ``out`` (installs the build packages first when run as root)."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed: the package builds on Debian and its derivatives only")
    if os.geteuid() != 0:
        missing = [p for p in BUILD_PACKAGES
                   if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
        if missing:
            pytest.skip(f"missing {' '.join(missing)} (make deb installs them as root)")
    env = dict(os.environ, SOURCE_DATE_EPOCH=source_date_epoch())
    done = subprocess.run(["make", "-s", "deb-package", f"DEB_DIR={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    path = os.path.join(out, f"omaha-agent_{version()}_all.deb")
    assert os.path.isfile(path), os.listdir(out)
    return path


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    return build(tmp_path_factory.mktemp("deb-one"))


@pytest.fixture(scope="module")
def unpacked(deb, tmp_path_factory):
    root = tmp_path_factory.mktemp("deb-root")
    subprocess.run(["dpkg-deb", "-x", deb, str(root)], check=True)
    control = tmp_path_factory.mktemp("deb-control")
    subprocess.run(["dpkg-deb", "-e", deb, str(control)], check=True)
    return root, control


def field(deb: str, name: str) -> list[str]:
    text = subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=True).stdout
    return [alt.strip() for alt in text.replace("\n", " ").split(",") if alt.strip()]


def names(relations: list[str]) -> set[str]:
    return {re.split(r"[\s(:]", rel, maxsplit=1)[0] for rel in relations}


def test_the_changelog_version_is_the_python_project_version():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert version() == tomllib.load(f)["project"]["version"]


def test_two_builds_of_the_same_tree_give_the_same_deb_bytes(deb, tmp_path):
    again = build(tmp_path / "another" / "directory")   # another build path too
    with open(deb, "rb") as a, open(again, "rb") as b:
        first, second = a.read(), b.read()
    print(f"\n.deb {len(first)} bytes, built twice: {'identical' if first == second else 'DIFFERENT'}")
    assert first == second


def test_the_deb_depends_on_debians_python_packages_and_recommends_zstandard(deb):
    depends = field(deb, "Depends")
    assert set(DEPENDS) <= names(depends)
    assert any(rel.startswith("python3:any") or rel.startswith("python3 ") for rel in depends), depends
    assert "python3-zstandard" in names(field(deb, "Recommends"))
    assert "python3-zstandard" not in names(depends)
    assert field(deb, "Architecture") == ["all"]


def test_the_deb_holds_the_agent_units_dbus_files_conffile_grub_fragment_and_uboot_script(unpacked):
    root, control = unpacked
    packaged = {
        "lib/systemd/system/omaha-agent.service": "systemd/omaha-agent.service",
        "lib/systemd/system/omaha-agent-confirm.service": "systemd/omaha-agent-confirm.service",
        "usr/share/dbus-1/system-services/org.omaha_agent.Agent1.service": "systemd/org.omaha_agent.Agent1.service",
        "usr/share/dbus-1/system.d/org.omaha_agent.Agent1.conf": "config/dbus/org.omaha_agent.Agent1.conf",
        "usr/lib/sysusers.d/omaha-agent.conf": "systemd/omaha-agent.sysusers",
        "usr/lib/tmpfiles.d/omaha-agent.conf": "systemd/omaha-agent.tmpfiles",
        "etc/omaha-agent/agent.yaml": "config/agent.yaml",
        "usr/share/omaha-agent/grub.cfg": "config/grub/grub.cfg",
        "usr/share/omaha-agent/uboot/boot.cmd": "config/uboot/boot.cmd",
        "usr/share/omaha-agent/uboot/fw_env.config": "config/uboot/fw_env.config",
    }
    for inside, source in packaged.items():
        with open(root / inside, "rb") as got, open(os.path.join(ROOT, source), "rb") as want:
            assert got.read() == want.read(), inside
    assert (root / "etc/omaha-agent/keys").is_dir()
    # every module of the source tree, and the launcher Debian's python3 runs
    modules = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "agent"))
               for f in fs if f.endswith(".py")}
    site = root / "usr/lib/python3/dist-packages"
    assert modules and all((site / m).is_file() for m in modules), sorted(m for m in modules
                                                                         if not (site / m).is_file())
    launcher = root / "usr/bin/omaha-agent"
    assert os.access(launcher, os.X_OK)
    assert launcher.read_text().splitlines()[0] == "#!/usr/bin/python3"
    assert "agent.cli" in launcher.read_text()
    assert (control / "conffiles").read_text().split() == ["/etc/omaha-agent/agent.yaml"]


def test_the_postinst_creates_the_group_before_the_directories_and_enables_both_units(unpacked):
    _, control = unpacked
    postinst = (control / "postinst").read_text()
    sysusers = postinst.index("systemd-sysusers")
    tmpfiles = postinst.index("systemd-tmpfiles")
    assert sysusers < tmpfiles   # /run/omaha-agent is group omaha-agent
    for unit in ("omaha-agent.service", "omaha-agent-confirm.service"):
        assert f"deb-systemd-helper enable '{unit}'" in postinst
    # enabled, not started at installation (the device's configuration comes first)
    assert "deb-systemd-invoke start" not in postinst and "deb-systemd-invoke restart" not in postinst
    assert "try-restart" in postinst   # an upgrade restarts a running daemon
    prerm = (control / "prerm").read_text()
    assert re.search(r'"\$1" = remove .*\n\s*deb-systemd-invoke stop omaha-agent.service', prerm), prerm
    assert "purge" in (control / "postrm").read_text()


def test_lintian_reports_no_errors_on_the_deb(deb):
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (make deb installs it as root)")
    done = subprocess.run(["lintian", deb], capture_output=True, text=True, timeout=300)
    tags = [line for line in done.stdout.splitlines() if re.match(r"[EWIN]: ", line)]
    errors = [t for t in tags if t.startswith("E: ")]
    warnings = [t for t in tags if t.startswith("W: ")]
    print(f"\nlintian: {len(errors)} errors, {len(warnings)} warnings" +
          "".join(f"\n  {w}" for w in warnings))
    assert not errors, errors

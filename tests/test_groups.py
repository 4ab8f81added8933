"""Slot groups: a release of several images (a kernel and a root filesystem), each written to the inactive member
of its own A/B pair, armed as one set. Against the development server on 127.0.0.1 with signatures required (keys
made by openssl), slot files and the sim bootloader; the bootloader's writes are recorded by a SimBoot that keeps a
list of its calls (the real SimBoot underneath)."""
import asyncio
import base64
import json
import os
import re
import signal
import sys
from dataclasses import replace

import pytest

from agent import trust
from agent.boot.sim import SimBoot
from agent.config import ConfigError, load, parse
from agent.daemon import Agent, AgentError
from agent.groups import PlanError, SlotGroup, plan
from agent.omaha.outcome import PackageOffer
from agent.slots import SlotSpec
from agent.state import Checkpoint, State, Written, from_json
from agent.tools.devserver import DevServer, Image

from .simdevice import APP, ROOT, Device
from .test_trust import openssl_key

KERNEL, ROOTFS = 1 << 20, 3 << 20


# ---------------------------------------------------------------------------------------------- configuration
BASE = """server: {url: "http://127.0.0.1:9/", insecure_http: true}
app: {id: "x"}
boot: {backend: sim, env: /tmp/env}
"""
GROUPS = """slots:
  rootfs: {a: {partlabel: ROOT-A}, b: {partlabel: ROOT-B}, package: "rootfs*.img*"}
  boot: {a: {partlabel: KERN-A}, b: {partlabel: KERN-B}, package: "kernel*"}
"""


def test_the_one_pair_form_is_one_group_named_rootfs_taking_any_package():
    config = parse(BASE + "slots: {a: {partlabel: ROOT-A}, b: {partlabel: ROOT-B}}\n")
    assert config.slots == {"a": SlotSpec("partlabel", "ROOT-A"), "b": SlotSpec("partlabel", "ROOT-B")}
    assert config.groups == (SlotGroup("rootfs", config.slots["a"], config.slots["b"], ""),)


def test_named_groups_keep_their_order_and_the_first_is_the_root_filesystems_pair():
    config = parse(BASE + GROUPS)
    assert [(g.name, g.a.value, g.b.value, g.package) for g in config.groups] == [
        ("rootfs", "ROOT-A", "ROOT-B", "rootfs*.img*"), ("boot", "KERN-A", "KERN-B", "kernel*")]
    assert config.slots == config.groups[0].specs  # what booted-slot detection and the one-image path use


@pytest.mark.parametrize("slots,says", [
    (GROUPS.replace("package: \"rootfs*.img*\"", "package: \"rootfs*.img*\", size: 3"),
     "agent.yaml:2: slots.rootfs.size: unknown key (known: a, b, package)"),
    (GROUPS.replace(", package: \"kernel*\"", ""), "agent.yaml:3: slots.boot: group boot needs package"),
    (GROUPS.replace("b: {partlabel: KERN-B}, ", ""), "agent.yaml:3: slots.boot: group boot needs b"),
    (GROUPS.replace("KERN-B", "ROOT-A"), "agent.yaml:3: slots.boot.b: partlabel=ROOT-A is also slots.rootfs.a"),
    ("slots:\n  a: {partlabel: ROOT-A}\n  b: {partlabel: ROOT-B}\n"
     "  boot: {a: {partlabel: KERN-A}, b: {partlabel: KERN-B}, package: kernel}\n",
     "agent.yaml:4: slots.boot: mixes the two forms of slots"),
    ("slots:\n" + "".join(f"  g{i}: {{a: {{partlabel: A{i}}}, b: {{partlabel: B{i}}}, package: p{i}}}\n"
                          for i in range(9)), "agent.yaml:1: slots: 9 slot groups; at most 8"),
    (GROUPS.replace("  boot:", "  Boot:"), "agent.yaml:3: slots.Boot: a slot group's name is a lower-case letter"),
    (GROUPS.replace("package: \"kernel*\"", "package: \"\""), "agent.yaml:3: slots.boot.package: must be"),
])
def test_each_mistake_in_slot_groups_is_a_one_line_error_naming_its_line(slots, says):
    with pytest.raises(ConfigError) as err:
        parse(slots + BASE)
    assert str(err.value).startswith(says) and "\n" not in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------- matching
def pkg(name: str) -> PackageOffer:
    return PackageOffer(name, (f"http://127.0.0.1:9/{name}",), 10, b"\1" * 32, None)


def test_each_package_goes_to_the_group_its_glob_matches_in_the_offers_order():
    groups = parse(BASE + GROUPS).groups
    pairs = plan((pkg("kernel-6.1.efi"), pkg("rootfs.img.zst")), groups)
    assert [(p.name, g.name) for p, g in pairs] == [("kernel-6.1.efi", "boot"), ("rootfs.img.zst", "rootfs")]


@pytest.mark.parametrize("names,says", [
    (("rootfs.img",), "group boot gets no package"),
    (("rootfs.img", "kernel", "initrd.img"), "package 'initrd.img' matches no group"),
    (("rootfs.img", "rootfs.img.zst", "kernel"), "group rootfs matches 'rootfs.img' and 'rootfs.img.zst'"),
])
def test_missing_extra_or_doubled_packages_do_not_fit_and_the_error_names_packages_and_globs(names, says):
    with pytest.raises(PlanError) as err:
        plan(tuple(map(pkg, names)), parse(BASE + GROUPS).groups)
    assert says in str(err.value) and "rootfs: 'rootfs*.img*'" in str(err.value) and "boot: 'kernel*'" in str(err.value)


def test_a_package_two_globs_match_is_refused_as_ambiguous():
    groups = (SlotGroup("one", SlotSpec("file", "/1"), SlotSpec("file", "/2"), "os*"),
              SlotGroup("two", SlotSpec("file", "/3"), SlotSpec("file", "/4"), "*.img"))
    with pytest.raises(PlanError, match="package 'os.img' matches groups one, two"):
        plan((pkg("os.img"), pkg("x")), groups)


def test_the_one_pair_form_takes_one_package_of_any_name_and_refuses_two():
    groups = parse(BASE + "slots: {a: {file: /x}, b: {file: /y}}\n").groups
    assert plan((pkg("whatever.bin"),), groups)[0][1].name == "rootfs"
    with pytest.raises(PlanError, match="has 2 packages"):
        plan((pkg("a"), pkg("b")), groups)


def test_state_without_the_new_fields_loads_and_the_new_fields_round_trip():
    old = {"download": {"version": "2.0.0", "slot": "b", "sha256": "ab" * 32, "size": 5, "received": 2,
                        "compressed": False}}
    state, dropped = from_json(old)
    assert state.download == Checkpoint("2.0.0", "b", "ab" * 32, 5, 2, False, "") and not dropped
    new = State(download=Checkpoint("2.0.0", "b", "ab" * 32, 5, 2, False, "rootfs.img"),
                written=[Written("2.0.0", "b", "boot", "kernel", "cd" * 32, 7, "cd" * 32, 7)])
    again, dropped = from_json(json.loads(json.dumps(new.to_json())))
    assert (again.download, again.written, dropped) == (new.download, new.written, [])


# ---------------------------------------------------------------------------------------------- the statement
def two_packages(**change) -> dict:
    body = json.loads(trust.statement("kernel", "aa" * 32, APP, "2.0.0", 10,
                                      more=(trust.Artifact("rootfs.img", "bb" * 32, 20),)))
    for key, value in change.items():
        body[key] = value(body)
    return body


def opened(body: dict, keys) -> trust.Release:
    return trust.open_envelope(trust.sign_statement(json.dumps(body).encode(), trust.load_private_key(keys[0])),
                               trust.load_public_keys([keys[1]]))


def test_a_statement_of_several_packages_lists_each_by_name_digest_and_size(keys):
    release = opened(two_packages(), keys)
    assert release.packages == (trust.Artifact("kernel", "aa" * 32, 10), trust.Artifact("rootfs.img", "bb" * 32, 20))
    offered = (PackageOffer("kernel", ("u",), 10, b"\xaa" * 32, None), PackageOffer("rootfs.img", ("u",), 20,
                                                                                   b"\xbb" * 32, None))
    trust.check_release(release, appid=APP, version="2.0.0", sha256_hex="aa" * 32, size=10, track="stable",
                        board="", packages=offered)
    for bad, says in ((offered[:1] + (replace(offered[1], size=21),), "the signed size of rootfs.img 20 is not the "
                                                                       "offered 21"),
                      (offered[:1] + (replace(offered[1], sha256=b"\xcc" * 32),), "the signed digest of rootfs.img"),
                      (offered[:1] + (replace(offered[1], name="other.img"),), "'other.img' is not in the signed"),
                      (offered[:1], "the signed release has 2 packages, the offer 1 (not offered: rootfs.img)")):
        with pytest.raises(trust.SignatureError, match=re.escape(says)):
            trust.check_release(release, appid=APP, version="2.0.0", sha256_hex="aa" * 32, size=10, track="stable",
                                board="", packages=bad)


@pytest.mark.parametrize("change,says", [
    ({"subject": lambda b: [b["subject"][0], {"name": "rootfs.img", "digest": {"sha256": "cc" * 32}}]},
     "package 'rootfs.img' is not among its subjects"),
    ({"subject": lambda b: b["subject"][:1]}, "must name every package, and only them, as subjects"),
    ({"predicate": lambda b: dict(b["predicate"], size=11)}, "first package is not its first subject"),
    ({"predicate": lambda b: dict(b["predicate"], packages=b["predicate"]["packages"] * 2)}, "lists a package twice"),
    ({"predicate": lambda b: dict(b["predicate"], image={"sha256": "aa" * 32, "size": 1})},
     "adaptive releases are of one package"),
])
def test_a_statement_of_several_packages_that_does_not_hold_together_is_refused(keys, change, says):
    with pytest.raises(trust.SignatureError, match=re.escape(says)):
        opened(two_packages(**change), keys)


# ---------------------------------------------------------------------------------------------- end to end
class RecordingSim(SimBoot):
    """The sim bootloader, keeping a list of the writes asked of it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def mark_bad(self, slot):
        self.calls.append(("mark_bad", slot))
        super().mark_bad(slot)

    def set_trial(self, slot, tries, version=None):
        self.calls.append(("set_trial", slot, version))
        super().set_trial(slot, tries, version)


@pytest.fixture
def keys(tmp_path):
    return openssl_key(tmp_path, "ed25519", "release")


def release(tmp_path, version="2.0.0") -> Image:
    """kernel-V.img (1 MiB) then rootfs-V.img (3 MiB), offered in that order."""
    paths = {}
    for name, size in (("kernel", KERNEL), ("rootfs", ROOTFS)):
        paths[name] = tmp_path / f"{name}-{version}.img"
        paths[name].write_bytes(name.upper().encode() + os.urandom(size - len(name)))
    return Image(str(paths["kernel"]), version, APP, parts=(Image(str(paths["rootfs"]), version, APP),))


async def serve(tmp_path, keys, **kw) -> DevServer:
    """The development server offering ``release`` signed with ``keys``."""
    srv = DevServer([release(tmp_path)], sign_key=keys[0], log_path=str(tmp_path / "server.jsonl"), **kw)
    await srv.start()
    return srv


def group_device(tmp_path, srv, keys, extra="", protocol="3.0") -> Device:
    dev = Device(tmp_path, srv.url, trust=f"trust: {{keys: [{keys[1]}], require_signature: true}}\n", extra=extra,
                 protocol=protocol)
    dev.kernels = {s: str(tmp_path / f"kern-{s}.img") for s in "ab"}
    for path in dev.kernels.values():
        with open(path, "wb") as f:
            f.truncate(2 << 20)
    text = open(dev.config).read()
    one_pair = f"slots:\n  a: {{file: {dev.slots['a']}}}\n  b: {{file: {dev.slots['b']}}}\n"
    assert one_pair in text
    with open(dev.config, "w") as f:
        f.write(text.replace(one_pair, f"""slots:
  rootfs: {{a: {{file: {dev.slots['a']}}}, b: {{file: {dev.slots['b']}}}, package: "rootfs-*.img"}}
  boot: {{a: {{file: {dev.kernels['a']}}}, b: {{file: {dev.kernels['b']}}}, package: "kernel-*"}}
"""))
    return dev


async def run_once(dev: Device, snapshots: list | None = None) -> tuple[RecordingSim, str]:
    """One check in this process, through the daemon, with the bootloader's writes recorded (and the status
    snapshots it published, into ``snapshots``)."""
    boot = RecordingSim(str(dev.dir / "bootenv.json"), dev.slots)
    agent = Agent(load(dev.config), boot=boot)
    if snapshots is not None:
        agent.listeners.append(lambda snap: snapshots.append((snap["operation"], snap["progress"], snap["new_size"])))
    try:
        result = await agent.run_once()
    except AgentError as exc:
        result = f"error: {exc}"
    finally:
        await agent.close()
    return boot, result


def holds(path: str, image_path: str) -> bool:
    data = open(image_path, "rb").read()
    with open(path, "rb") as f:
        return f.read(len(data)) == data


def zeros(path: str) -> bool:
    return open(path, "rb").read().count(0) == os.path.getsize(path)


def streamed(srv: DevServer, name: str) -> list[dict]:
    """The payload downloads the server logged for ``name`` (one line per answer, where it started)."""
    lines = open(srv.log_path).read().splitlines() if os.path.exists(srv.log_path) else []
    return [r for r in map(json.loads, lines) if r["kind"] == "download" and r["name"] == name]


@pytest.mark.parametrize("protocol,dialect", [("3.0", "chromeos"), ("3.1", "chromeos"), ("3.0", "flatcar")])
async def test_a_signed_two_image_release_writes_both_b_members_and_arms_the_set_once(tmp_path, keys, protocol,
                                                                                      dialect):
    srv = await serve(tmp_path, keys, dialect=dialect, protocol=protocol)
    try:
        dev = group_device(tmp_path, srv, keys, protocol=protocol)
        snaps = []
        boot, result = await run_once(dev, snaps)
        assert result.startswith("installed 2.0.0 on slot b"), result
        kernel, rootfs = srv.images[0], srv.images[0].parts[0]
        assert holds(dev.kernels["b"], kernel.path) and holds(dev.slots["b"], rootfs.path)
        assert zeros(dev.kernels["a"]) and zeros(dev.slots["a"])  # the booted letter is never written
        assert boot.calls == [("mark_bad", "b"), ("set_trial", "b", "2.0.0")]  # one bootloader write arms the set
        assert srv.event_codes() == ["13/1", "14/1", "3/1"]
        progress = [p for op, p, size in snaps if op == "downloading" and size == KERNEL + ROOTFS]
        assert progress == sorted(progress) and progress[-1] == 1.0  # one progress over both images' bytes
        assert any(0.2 < p < 0.3 for p in progress)  # the kernel's quarter done
        assert [r["name"] for r in map(json.loads, open(srv.log_path)) if r["kind"] == "download"] == [
            "kernel-2.0.0.img", "rootfs-2.0.0.img"]  # the offer's order
        assert dev.state()["written"] == [] and dev.state()["trial"]["armed"]
    finally:
        await srv.stop()


async def test_a_post_install_command_sees_each_groups_target_device(tmp_path, keys):
    out = tmp_path / "env"
    srv = await serve(tmp_path, keys)
    try:
        dev = group_device(tmp_path, srv, keys, extra=f"install: {{post_install: [\"env > {out}\"], "
                                                    "post_install_network: true}\n")
        boot, result = await run_once(dev)
        assert result.startswith("installed 2.0.0"), result
        env = dict(line.split("=", 1) for line in out.read_text().splitlines() if line.startswith("OMAHA_AGENT_"))
        assert env["OMAHA_AGENT_TARGET_ROOTFS"] == dev.slots["b"] and env["OMAHA_AGENT_TARGET_BOOT"] == dev.kernels["b"]
        assert env["OMAHA_AGENT_DEVICE"] == dev.slots["b"] and env["OMAHA_AGENT_SLOT"] == "b"  # as before
    finally:
        await srv.stop()


async def test_a_corrupted_second_image_arms_nothing_and_reports_one_3_0(tmp_path, keys):
    srv = await serve(tmp_path, keys)
    try:
        rootfs = srv.images[0].parts[0]
        srv.sign(srv.images[0])  # signed as built; the file served then goes bad on the server's disk
        with open(rootfs.path, "r+b") as f:
            f.seek(ROOTFS // 2)
            f.write(b"\xff" * 4096)
        dev = group_device(tmp_path, srv, keys)
        boot, result = await run_once(dev)
        assert result.startswith("error: update to 2.0.0 failed") and "rootfs-2.0.0.img: SHA-256 mismatch" in result, result
        assert holds(dev.kernels["b"], srv.images[0].path)  # the first image was written ...
        assert ("set_trial", "b", "2.0.0") not in [c[:3] for c in boot.calls]  # ... and never armed
        assert boot.status()["b"].state.value == "bad"
        assert srv.event_codes() == ["13/1", "3/0"] and srv.events[-1]["errorcode"] == 10
        state = dev.state()
        assert state["trial"] is None and state["written"] == [] and "\n" not in state["last_error"]
    finally:
        await srv.stop()


async def test_a_statement_missing_one_packages_subject_is_refused_before_any_slot_is_written(tmp_path, keys):
    srv = await serve(tmp_path, keys)
    try:
        srv.sign(srv.images[0])
        env = json.loads(srv.images[0].signature)
        body = json.loads(base64.b64decode(env["payload"]))
        body["subject"] = body["subject"][:1]  # the rootfs package is listed in the predicate, not as a subject
        srv.images[0].signature = trust.sign_statement(json.dumps(body).encode(), trust.load_private_key(keys[0]))
        dev = group_device(tmp_path, srv, keys)
        env_before = (dev.dir / "bootenv.json").read_bytes()
        boot, result = await run_once(dev)
        assert "signature refused" in result and "subjects" in result, result
        assert boot.calls == [] and (dev.dir / "bootenv.json").read_bytes() == env_before
        assert all(zeros(p) for p in (*dev.slots.values(), *dev.kernels.values()))
        assert srv.streams == [] and srv.event_codes() == ["3/0"] and srv.events[0]["errorcode"] == 18
    finally:
        await srv.stop()


async def test_a_release_signed_as_one_package_is_refused_for_an_offer_of_two(tmp_path, keys):
    srv = await serve(tmp_path, keys)
    try:
        kernel = srv.images[0]
        kernel.signature = trust.sign_file(kernel.path, trust.load_private_key(keys[0]), APP, "2.0.0",
                                           name=kernel.name)
        dev = group_device(tmp_path, srv, keys)
        boot, result = await run_once(dev)
        assert "signature refused: the signed statement lists one payload, the offer has 2 packages" in result, result
        assert boot.calls == [] and srv.streams == []
    finally:
        await srv.stop()


async def test_an_offer_that_does_not_fit_the_groups_is_one_3_0_naming_packages_and_globs(tmp_path, keys):
    srv = await serve(tmp_path, keys)
    try:
        srv.images[0].parts = ()  # the kernel alone
        dev = group_device(tmp_path, srv, keys)
        boot, result = await run_once(dev)
        assert ("the offered packages ('kernel-2.0.0.img') do not fit the slot groups (rootfs: 'rootfs-*.img', "
                "boot: 'kernel-*'): group rootfs gets no package") in result, result
        assert boot.calls == [] and srv.streams == []
        assert srv.event_codes() == ["3/0"] and srv.events[0]["errorcode"] == 3
        assert "\n" not in dev.state()["last_error"]
    finally:
        await srv.stop()


DAEMON = ["-m", "agent.cli", "daemon", "--config"]


@pytest.mark.parametrize("how", ["stop", "power cut"])
async def test_a_cut_mid_second_image_resumes_it_and_the_first_is_hashed_again_not_downloaded(tmp_path, keys, how):
    srv = await serve(tmp_path, keys)
    try:
        srv.faults.drip_delay = 0.1  # 64 KiB pieces: the kernel takes 1.6 s, the rootfs 4.8 s
        dev = group_device(tmp_path, srv, keys, extra="schedule: {initial_delay: 0, interval: 3600}\n"
                                                      "dbus: {enabled: false}\n")
        proc = await asyncio.create_subprocess_exec(sys.executable, *DAEMON, dev.config, cwd=ROOT,
                                                    env=dict(os.environ, PYTHONPATH=ROOT),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        for _ in range(600):  # the kernel's answer is done, a third of the rootfs's sent
            await asyncio.sleep(0.05)
            if len(srv.streams) == 2 and srv.streams[0]["done"] and srv.streams[1]["sent_to"] >= 1 << 20:
                break
        # a stop: the service cancels the download and checkpoints it; a power cut: nothing more is written
        proc.send_signal(signal.SIGTERM if how == "stop" else signal.SIGKILL)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == (0 if how == "stop" else -signal.SIGKILL), err.decode()[-2000:]
        state = dev.state()
        assert [(w["group"], w["package"]) for w in state["written"]] == [("boot", "kernel-2.0.0.img")]
        # the checkpoint names the image it is for (a power cut leaves the rootfs's starting one: a restart
        # resumes soon, from byte 0 of the rootfs only)
        assert state["download"]["package"] == "rootfs-2.0.0.img"
        received = state["download"]["received"]
        assert (0 < received < ROOTFS) if how == "stop" else received == 0
        assert SimBoot(str(dev.dir / "bootenv.json")).status()["b"].state.value == "bad"
        srv.faults.drip_delay = 0

        boot, result = await run_once(dev)  # restarted
        assert result.startswith("installed 2.0.0 on slot b"), result
        assert len(streamed(srv, "kernel-2.0.0.img")) == 1  # not downloaded again ...
        assert [s["start"] for s in streamed(srv, "rootfs-2.0.0.img")] == [0, received]  # resumed where it stopped
        assert holds(dev.kernels["b"], srv.images[0].path) and holds(dev.slots["b"], srv.images[0].parts[0].path)
        assert boot.calls == [("mark_bad", "b"), ("set_trial", "b", "2.0.0")]
        assert srv.event_codes().count("3/1") == 1 and "3/0" not in srv.event_codes()
    finally:
        await srv.stop()


async def test_a_first_image_changed_on_its_slot_while_stopped_fails_the_set_unarmed(tmp_path, keys, caplog):
    srv = await serve(tmp_path, keys)
    try:
        dev = group_device(tmp_path, srv, keys)
        kernel, rootfs = srv.images[0], srv.images[0].parts[0]
        with open(dev.kernels["b"], "r+b") as f:  # a record says the kernel is there; the slot says otherwise
            f.write(open(kernel.path, "rb").read()[:-1] + b"\0")
        state = {"written": [{"version": "2.0.0", "slot": "b", "group": "boot", "package": kernel.name,
                              "sha256": kernel.sha256.hex(), "size": kernel.size, "image_sha256": kernel.sha256.hex(),
                              "image_size": kernel.size}]}
        os.makedirs(dev.dir / "state", exist_ok=True)
        (dev.dir / "state" / "state.json").write_text(json.dumps(state))
        boot, result = await run_once(dev)
        assert "slot b of group boot no longer holds kernel-2.0.0.img" in result, result
        assert streamed(srv, kernel.name) == [] and len(streamed(srv, rootfs.name)) == 1  # skipped, then hashed
        assert ("set_trial", "b", "2.0.0") not in [c[:3] for c in boot.calls]
        assert srv.event_codes() == ["13/1", "3/0"] and srv.events[-1]["errorcode"] == 10
        assert dev.state()["written"] == [] and dev.state()["blocked"] is None
        boot, result = await run_once(dev)  # the next attempt downloads every image (not blocked: the slot changed)
        assert result.startswith("installed 2.0.0 on slot b"), result
        assert len(streamed(srv, kernel.name)) == 1 and len(streamed(srv, rootfs.name)) == 2
        assert holds(dev.kernels["b"], kernel.path) and boot.calls[-1] == ("set_trial", "b", "2.0.0")
    finally:
        await srv.stop()


async def test_staged_groups_apply_hashes_every_image_again_after_a_boot(tmp_path, keys):
    from agent.machine import Apply
    srv = await serve(tmp_path, keys)
    try:
        dev = group_device(tmp_path, srv, keys, extra="install: {arm: on-apply}\n")
        boot, result = await run_once(dev)
        assert result.startswith("staged 2.0.0 on slot b"), result
        staged = dev.state()["staged"]
        assert [i[0] for i in staged["images"]] == ["boot", "rootfs"]
        assert SimBoot(str(dev.dir / "bootenv.json"), dev.slots).reboot() == "a"  # a power cut: the set is unarmed
        with open(dev.slots["b"], "r+b") as f:  # the second image changed while the device was down
            f.seek(ROOTFS - 10)
            f.write(b"x")
        with open(dev.config, "a") as f:
            f.write("schedule: {initial_delay: 3600}\ndbus: {enabled: false}\n")
        boot = RecordingSim(str(dev.dir / "bootenv.json"), dev.slots)
        agent = Agent(load(dev.config), boot=boot)
        try:
            await agent.start()
            reply = await agent.submit(Apply())
        finally:
            await agent.close()
        assert not reply.acted and "slot b of group rootfs no longer holds the verified image" in reply.message, \
            reply.message
        assert boot.calls == [] and boot.status()["b"].state.value == "bad"
    finally:
        await srv.stop()


async def test_cli_signs_several_payloads_as_one_release(tmp_path, keys):
    rel = release(tmp_path)
    dev = Device(tmp_path, "http://127.0.0.1:9/")  # only for its cli helper; no server is contacted
    rc, out, err = await dev.cli("sign", "--key", keys[0], "--appid", APP, "--version", "2.0.0", rel.path,
                                 "--package", rel.parts[0].path, config=False)
    assert rc == 0 and out.strip().endswith(rel.path + ".sig"), err
    got = trust.open_envelope(open(rel.path + ".sig", "rb").read(), trust.load_public_keys([keys[1]]))
    assert got.packages == (trust.Artifact(rel.name, rel.sha256.hex(), rel.size),
                            trust.Artifact(rel.parts[0].name, rel.parts[0].sha256.hex(), rel.parts[0].size))
    assert (got.name, got.sha256, got.size) == (rel.name, rel.sha256.hex(), rel.size)  # the first, as before


async def test_one_package_on_the_one_pair_form_or_one_named_group_takes_the_one_image_path(tmp_path, keys):
    from .simdevice import image
    srv = DevServer([image(tmp_path, "2.0.0")], sign_key=keys[0])
    await srv.start()
    try:
        for name, glob in (("plain", None), ("named", "v*.img")):
            (tmp_path / name).mkdir()
            dev = Device(tmp_path / name, srv.url, trust=f"trust: {{keys: [{keys[1]}], require_signature: true}}\n")
            if glob:
                text = open(dev.config).read()
                with open(dev.config, "w") as f:
                    f.write(text.replace("slots:\n  a: {", "slots:\n  os:\n    a: {").replace(
                        "\n  b: {", "\n    b: {").replace("\nboot:", f"\n    package: \"{glob}\"\nboot:", 1))
                assert [g.name for g in load(dev.config).groups] == ["os"]
            boot, result = await run_once(dev)
            assert result.startswith("installed 2.0.0 on slot b"), (name, result)
            assert boot.calls == [("mark_bad", "b"), ("set_trial", "b", "2.0.0")] and holds(dev.slots["b"],
                                                                                          srv.images[0].path)
        assert srv.event_codes() == ["13/1", "14/1", "3/1"] * 2
    finally:
        await srv.stop()


async def test_the_one_pair_form_refuses_an_offer_of_two_packages_as_before(tmp_path, keys):
    srv = await serve(tmp_path, keys)
    try:
        dev = Device(tmp_path, srv.url, trust=f"trust: {{keys: [{keys[1]}], require_signature: true}}\n")
        boot, result = await run_once(dev)
        assert result == "error: offer of 2.0.0 has 2 packages; a slot takes exactly one", result
        assert boot.calls == [] and srv.events == []
    finally:
        await srv.stop()


async def test_an_offline_install_with_several_groups_is_refused_in_a_line_without_an_event(tmp_path, keys):
    from agent.machine import InstallFile
    srv = await serve(tmp_path, keys)
    try:
        dev = group_device(tmp_path, srv, keys, extra="schedule: {initial_delay: 3600}\ndbus: {enabled: false}\n")
        kernel = srv.images[0]
        srv.sign(kernel)
        with open(kernel.path + ".sig", "wb") as f:
            f.write(kernel.signature)
        boot = RecordingSim(str(dev.dir / "bootenv.json"), dev.slots)
        agent = Agent(load(dev.config), boot=boot)
        try:
            await agent.start()
            reply = await agent.submit(InstallFile(kernel.path))
            outcome = await agent.owner.finished(reply.job) if reply.job is not None else None
        finally:
            await agent.close()
        message = outcome.message if outcome is not None else reply.message
        assert message.endswith("not installed: a file is one image; these slot groups take a release of several"), \
            message
        assert boot.calls == [] and srv.events == [] and zeros(dev.kernels["b"])
    finally:
        await srv.stop()


async def test_a_group_member_too_small_for_its_image_fails_before_any_slot_is_marked_or_written(tmp_path, keys):
    srv = await serve(tmp_path, keys)
    try:
        dev = group_device(tmp_path, srv, keys)
        os.truncate(dev.kernels["b"], KERNEL // 2)
        boot, result = await run_once(dev)
        assert "group boot: payload of 1048576 bytes is larger than slot b (524288 bytes)" in result, result
        assert boot.calls == [] and srv.streams == [] and zeros(dev.slots["b"])
        assert srv.event_codes() == ["3/0"] and srv.events[0]["errorcode"] == 7
    finally:
        await srv.stop()

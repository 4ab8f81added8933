"""``omaha-agent``: the daemon and the commands that need no daemon (slots, config check, devserver, demo)."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from .config import DEFAULT_PATH, ConfigError, load


def _fail(message: str, code: int = 1) -> int:
    print(f"omaha-agent: {message}", file=sys.stderr)
    return code


def cmd_config_check(args) -> int:
    config = load(args.config)
    print(f"{args.config}: ok (server {config.server.url}, protocol {config.server.protocol}, "
          f"backend {config.boot.backend}, slots {config.slots['a'].describe()} / {config.slots['b'].describe()})")
    return 0


def cmd_slots(args) -> int:
    from .daemon import read_slots
    view = asyncio.run(read_slots(load(args.config)))
    if args.json:
        print(json.dumps(view, sort_keys=True))
        return 0
    print(f"{'slot':<5}{'state':<8}{'tries':<7}{'version':<20}")
    for name, s in view["slots"].items():
        mark = "*" if name == view["booted"] else " "
        print(f"{mark}{name:<4}{s['state']:<8}{s.get('tries_left', 0):<7}{s.get('version') or '-':<20}")
    print("(* booted)")
    return 0


def cmd_sim_reboot(args) -> int:
    config = load(args.config)
    if config.boot.backend != "sim":
        return _fail(f"sim-reboot works with the sim backend only (this config uses {config.boot.backend})")
    from .daemon import make_boot
    print(make_boot(config).reboot())
    return 0


def cmd_daemon(args) -> int:
    from . import log as logsetup
    from .daemon import Agent, AgentError
    # --once keeps stderr for warnings and its one-line verdict unless -v asks for the whole story
    logsetup.setup(args.verbose, quiet=args.once and not args.verbose)
    config = load(args.config)

    async def once() -> int:
        agent = Agent(config)
        try:
            print(await agent.run_once())
            return 0
        except AgentError as exc:
            return _fail(str(exc))

    async def forever() -> int:
        from .dbus import DbusUnavailable
        from .service import serve
        try:
            await serve(config)
        except DbusUnavailable as exc:
            return _fail(str(exc))
        return 0

    return asyncio.run(once() if args.once else forever())


def cmd_devserver(args) -> int:
    from .tools.devserver import serve
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


def cmd_fleetlock_server(args) -> int:
    import asyncio

    from .tools.fleetlockserver import serve
    try:
        asyncio.run(serve(args.host, args.port, args.slots))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        return _fail(f"fleetlock-server: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    return 0


def cmd_sign(args) -> int:
    from .adaptive.release import ReleaseError, data_path_for, sign
    from .trust import SignatureError, TrustKeyError, file_artifact, load_private_key, sign_file
    if args.chunks and args.package:
        return _fail("sign: --package and --chunks do not go together (an adaptive release is one package)")
    if args.chunks:
        args.payload = args.payload or data_path_for(args.chunks)
    elif not args.payload:
        return _fail("sign: name the payload (or --chunks NAME.cidx, whose data file is then the payload)")
    try:
        key = load_private_key(args.key)
        if args.chunks:
            envelope = sign(args.payload, args.chunks, key, args.appid, args.version, args.track, args.board)
        else:
            more = tuple(file_artifact(path) for path in args.package)
            envelope = sign_file(args.payload, key, args.appid, args.version, args.track, args.board, more=more)
    except (TrustKeyError, ReleaseError, SignatureError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"sign: cannot read {exc.filename or args.payload}: {exc.strerror or exc}")
    out = args.output or args.payload + ".sig"
    with open(out, "wb") as f:
        f.write(envelope)
    what = f" with its chunks ({args.chunks})" if args.chunks else (
        f" with {len(args.package)} more package(s)" if args.package else "")
    print(f"signed {args.payload} as {args.appid} {args.version}{what}: {out}")
    return 0


def cmd_verify(args) -> int:
    """Checks the envelope's signature and that its statement names this payload (digest and size)."""
    import hashlib
    import os

    from .trust import MAX_ENVELOPE, SignatureError, TrustKeyError, load_public_keys, open_envelope
    sig_path = args.signature or args.payload + ".sig"
    try:
        with open(sig_path, "rb") as f:
            envelope = f.read(MAX_ENVELOPE + 1)
        release = open_envelope(envelope, load_public_keys(args.key))
        h = hashlib.sha256()
        with open(args.payload, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if release.sha256 != h.hexdigest() or release.size != os.path.getsize(args.payload):
            raise SignatureError(f"the signed digest and size are not those of {args.payload}")
        found = _check_chunk_files(release, os.path.dirname(os.path.abspath(args.payload)))
    except (SignatureError, TrustKeyError) as exc:
        return _fail(f"{sig_path}: {exc}")
    except OSError as exc:
        return _fail(f"verify: cannot read {args.payload}: {exc.strerror or exc}")
    shown = {"name": release.name, "sha256": release.sha256, "appid": release.appid, "version": release.version,
             "size": release.size, "track": release.track, "board": release.board}
    if release.image is not None:
        shown["image"] = {"sha256": release.image.sha256, "size": release.image.size}
        shown["chunks"] = {k: {"name": a.name, "sha256": a.sha256, "size": a.size, "checked": found[k]}
                           for k, a in (("index", release.chunks.index), ("data", release.chunks.data))}
    print(json.dumps(shown, indent=1))
    return 0


def _check_chunk_files(release, directory: str) -> dict:
    """An adaptive release's chunk files beside the payload must be the signed ones; a missing one is reported
    as unchecked (``False``), not as an error (a payload may be verified before its chunk files are copied)."""
    import os

    from .adaptive.release import file_digest
    from .trust import SignatureError
    found = {}
    if release.chunks is None:
        return found
    for key, ref in (("index", release.chunks.index), ("data", release.chunks.data)):
        path = os.path.join(directory, ref.name)
        if not os.path.exists(path):
            found[key] = False
            continue
        if file_digest(path) != (ref.sha256, ref.size):
            raise SignatureError(f"the signed chunk {key} {ref.name} is not the file beside the payload "
                                 "(digest or size)")
        found[key] = True
    return found


def cmd_chunk(args) -> int:
    """Cuts an image into its chunk index and chunk data (the adaptive release's files)."""
    from .adaptive.cut import CutError, cut
    try:
        r = cut(args.image, args.output_dir, name=args.name, level=args.level, threads=args.threads)
    except CutError as exc:
        return _fail(str(exc))
    print(f"{r.index_path}: {r.chunks} chunks ({r.zero_chunks} all zero) of a {r.image_size}-byte image, "
          f"sha256 {r.image_sha256}")
    print(f"{r.data_path}: {r.data_size} bytes of zstd frames (level {args.level}), "
          f"{r.image_size / max(r.seconds, 1e-9) / 1e6:.0f} MB/s ({r.seconds:.1f} s)")
    return 0


def cmd_demo(args) -> int:
    from .tools.demo import main as demo_main
    return demo_main(args)


def cmd_client(args) -> int:
    from . import console
    if args.command == "status":
        return console.run(console.status(args.json))
    if args.command == "check":
        return console.run(console.check(args.wait, args.timeout))
    if args.command == "watch":
        return console.run(console.watch(args.limit))
    if args.command == "install":
        return console.run(console.install(args.payload, args.sig or "", args.version or "", args.wait, args.timeout))
    if args.command == "postpone":
        return console.run(console.simple("PostponeReboot", "u", [args.seconds]))
    if args.command == "apply":  # after a reboot the agent hashes the staged slot again before it answers
        return console.run(console.simple("Apply", timeout=args.timeout))
    member = {"mark-good": "MarkGood", "reboot": "Reboot", "confirm-boot": "ConfirmBoot", "rollback": "Rollback"}[
        args.command]
    return console.run(console.simple(member))


def _seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
    if not number.isdigit() or not 0 < int(number) * unit < 1 << 32:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a number of seconds (e.g. 600, 30m, 2h)")
    return int(number) * unit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omaha-agent", description="A/B update agent speaking the Omaha protocol")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--config", default=DEFAULT_PATH, help=f"configuration file (default {DEFAULT_PATH})")
        return sp

    d = with_config(sub.add_parser("daemon", help="run the update agent"))
    d.add_argument("--once", action="store_true", help="deliver events, post-boot work, one check, then exit")
    d.add_argument("-v", "--verbose", action="store_true")
    d.set_defaults(func=cmd_daemon)
    s = with_config(sub.add_parser("slots", help="show the A/B slots and their states"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_slots)
    with_config(sub.add_parser("sim-reboot", help="emulate a reboot through the simulated bootloader")).set_defaults(
        func=cmd_sim_reboot)
    pv = with_config(sub.add_parser("provision", help="write the factory boot state: SLOT good, the other bad"))
    pv.add_argument("--slot", required=True, choices=("a", "b"), help="the slot the image boots from")
    pv.add_argument("--version", required=True, help="the version in that slot")
    pv.add_argument("--image-root", default=None, metavar="DIR",
                    help="an image being built: config paths are taken inside DIR (gpt: DIR is the disk image)")
    pv.add_argument("--index", default=None, metavar="FILE",
                    help="the chunk index of the image in that slot (its first update can then be adaptive)")
    pv.set_defaults(func=lambda args: __import__("agent.provision", fromlist=["main"]).main(args))
    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    with_config(csub.add_parser("check", help="validate a configuration file")).set_defaults(func=cmd_config_check)
    st = sub.add_parser("status", help="the running daemon's status (over D-Bus)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_client)
    ch = sub.add_parser("check", help="ask the daemon to check for an update now")
    ch.add_argument("--wait", action="store_true", help="follow the check (and its download) until it settles")
    ch.add_argument("--timeout", type=float, default=3600, help="give up waiting after this many seconds")
    ch.set_defaults(func=cmd_client)
    i = sub.add_parser("install", help="install a payload file through the daemon (offline; signature checked)")
    i.add_argument("payload", help="the payload file (somewhere the service can read: /media, /mnt, /run/media)")
    i.add_argument("--sig", default=None, help="its signature envelope (default PAYLOAD.sig)")
    i.add_argument("--version", default=None, help="its version, only when signatures are not required")
    i.add_argument("--wait", action="store_true", help="follow the install until it settles")
    i.add_argument("--timeout", type=float, default=3600, help="give up waiting after this many seconds")
    i.set_defaults(func=cmd_client)
    w = sub.add_parser("watch", help="print the daemon's status changes as they happen")
    w.add_argument("--limit", type=float, default=None, help=argparse.SUPPRESS)
    w.set_defaults(func=cmd_client)
    for name, text in (("mark-good", "confirm the booted trial slot as good (an external health check)"),
                       ("reboot", "reboot into an installed update"),
                       ("confirm-boot", "tell the daemon boot-complete.target is reached (omaha-agent-confirm.service)")):
        sub.add_parser(name, help=text).set_defaults(func=cmd_client)
    pp = sub.add_parser("postpone", help="move the planned reboot later (at most reboot.max_postpone)")
    pp.add_argument("seconds", type=_seconds, help="how much later, in seconds (or 30m, 2h)")
    pp.set_defaults(func=cmd_client)
    sub.add_parser("rollback", help="go back to the older system on the other slot (a trial boot, then the reboot "
                   "by reboot.policy)").set_defaults(func=cmd_client)
    ap = sub.add_parser("apply", help="arm the staged update (install.arm: on-apply) and plan the reboot by "
                        "reboot.policy")
    ap.add_argument("--timeout", type=float, default=600,
                    help="wait this many seconds for the answer (after a reboot the slot is hashed again first)")
    ap.set_defaults(func=cmd_client)
    fl = sub.add_parser("fleetlock-server", help="run a development FleetLock server (reboot slots per group)")
    fl.add_argument("--host", default="127.0.0.1")
    fl.add_argument("--port", type=int, default=8090)
    fl.add_argument("--slots", type=int, default=1, help="reboot slots per group (default 1)")
    fl.set_defaults(func=cmd_fleetlock_server)
    v = sub.add_parser("devserver", help="run the development Omaha server")
    v.add_argument("--payload", required=True)
    v.add_argument("--version", required=True)
    v.add_argument("--appid", required=True)
    v.add_argument("--track", default="")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8080)
    v.add_argument("--dialect", choices=["chromeos", "flatcar"], default="chromeos")
    v.add_argument("--protocol", choices=["3.0", "3.1"], default=None, help="answer only this protocol")
    v.add_argument("--log", default=None, help="write requests and events as JSON lines here")
    v.add_argument("--always-offer", action="store_true", help="offer even to clients already at the version")
    v.add_argument("--sign-key", default=None, help="PEM private key: serve <payload>.sig, a signed release envelope")
    v.add_argument("--cup-key", default=None, help="P-256 PEM private key: sign answers with CUP-ECDSA proofs")
    v.add_argument("--cup-key-version", type=int, default=1, help="the CUP key version clients name")
    v.add_argument("--chunks", default=None, metavar="NAME.cidx",
                   help="an adaptive release: serve NAME.cidx and NAME.czst beside the payload and name them in its "
                        "signature (the payload is usually NAME.czst)")
    v.add_argument("--package", action="append", default=[], metavar="FILE",
                   help="another image of the release, offered after the payload (slot groups; repeat for each)")
    v.add_argument("--payload-base", default=None, metavar="URL",
                   help="point payload URLs here (another file server holding the payload under its file name) "
                        "instead of at this server's /packages/")
    v.set_defaults(func=cmd_devserver)
    g = sub.add_parser("sign", help="sign a release: write its DSSE envelope (PAYLOAD.sig)")
    g.add_argument("--key", required=True, help="PEM private key (ECDSA P-256 or Ed25519)")
    g.add_argument("--appid", required=True)
    g.add_argument("--version", required=True)
    g.add_argument("--track", default=None)
    g.add_argument("--board", default=None)
    g.add_argument("--chunks", default=None, metavar="NAME.cidx",
                   help="an adaptive release: name the image and the chunk files (NAME.cidx and NAME.czst beside "
                        "it, checked frame by frame) in the statement; the payload defaults to NAME.czst")
    g.add_argument("--package", action="append", default=[], metavar="FILE",
                   help="another image of the same release (slot groups; repeat for each): the one envelope, beside "
                        "the payload, lists every package")
    g.add_argument("payload", nargs="?", default=None)
    g.add_argument("-o", "--output", default=None, help="where to write the envelope (default PAYLOAD.sig)")
    g.set_defaults(func=cmd_sign)
    f = sub.add_parser("verify", help="verify a release's envelope and print its statement")
    f.add_argument("--key", required=True, action="append", help="PEM public key (repeat for several)")
    f.add_argument("payload")
    f.add_argument("signature", nargs="?", default=None, help="the envelope (default PAYLOAD.sig)")
    f.set_defaults(func=cmd_verify)
    k = sub.add_parser("chunk", help="cut an image into content-defined chunks: IMAGE.cidx (index) and IMAGE.czst "
                       "(zstd frames; the adaptive release's payload)")
    k.add_argument("image", help="the raw image (e.g. the ext4 root file system)")
    k.add_argument("-o", "--output-dir", default=None, metavar="DIR", help="where to write them (default: beside "
                   "the image)")
    k.add_argument("--name", default=None, help="file name stem (default: the image's file name)")
    k.add_argument("--level", type=int, default=19, help="zstd level of each frame (default 19)")
    k.add_argument("--threads", type=int, default=None, help="compression threads (default: one per CPU)")
    k.set_defaults(func=cmd_chunk)
    m = sub.add_parser("demo", help="the whole A/B cycle on a simulated device, no root needed")
    m.add_argument("--dir", default=None, help="keep the simulated device here (default: a temp dir)")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        return _fail(f"config: {exc}", 2)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: one line, not a traceback
        from .boot import BootError
        from .slots import SlotError
        if isinstance(exc, (BootError, SlotError, OSError)):
            return _fail(str(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())

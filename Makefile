# The README's commands. Each target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages whose tools the tests use for real (grub-editenv, sfdisk, fw_setenv, dbus-daemon, busctl, ...)
SYSTEM_TOOLS := grub-editenv:grub-common sfdisk:fdisk fw_setenv:libubootenv-tool dbus-daemon:dbus systemd-analyze:systemd \
	busctl:systemd setpriv:util-linux xz:xz-utils mkfs.vfat:dosfstools mcopy:mtools openssl:openssl \
	tinyproxy:tinyproxy-bin nginx:nginx
# Debian's own Python packages the device images run, imported by the system's python3 in a child process
# (tests/test_debian_aiohttp.py: the agent's HTTP session under Debian 12's aiohttp)
SYSTEM_PACKAGES := python3-aiohttp python3-defusedxml
# bootctl (tests/test_boot_bls.py) is unpacked from Debian's systemd-boot package, never installed: its postinst
# runs 'bootctl install' into the machine's own ESP. The version matches the installed systemd (bootctl links
# against its private libsystemd-shared).
BOOTCTL := build/sdboot/usr/bin/bootctl

.PHONY: test fuzz demo bench system-deps venv clean install qemu-deps qemu-image qemu-test \
	qemu-deps-arm64 qemu-image-arm64 qemu-test-arm64 qemu-image-sdboot qemu-test-sdboot qemu-image-groups deb deb-deps deb-package

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Installs the Debian packages the tests need when their tools are missing (needs root; skipped otherwise).
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	for pkg in $(SYSTEM_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing system packages:$$missing (run as root or install them; the tests needing them will skip)"; fi; \
	fi

$(BOOTCTL):
	@mkdir -p build/sdboot && cd build/sdboot && \
	if apt-get download -q "systemd-boot=$$(dpkg-query -W -f='$${Version}' systemd)" >/dev/null 2>&1; then \
	  dpkg -x systemd-boot_*.deb . && rm -f systemd-boot_*.deb; \
	else echo "bootctl: cannot download systemd-boot (the bls backend's bootctl cross-checks will skip)"; fi

test: system-deps $(STAMP) $(BOOTCTL)
	PATH="$$PATH:/usr/sbin:/sbin:$(CURDIR)/build/sdboot/usr/bin" $(PY) -m pytest $(PYTEST_ARGS)

# A long property-based run of the decoders, the version order, the config and the state loaders (the normal
# suite runs 150 examples per target; FUZZ_EXAMPLES=N for another figure).
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) PATH="$$PATH:/usr/sbin:/sbin" $(PY) -m pytest -q tests/test_fuzz.py $(PYTEST_ARGS)

# The QEMU amd64-generic image and its boot test (root; see README "QEMU test").
QEMU_PACKAGES := qemu-system-x86 ovmf mmdebstrap grub-efi-amd64-bin grub-common dosfstools mtools fdisk e2fsprogs \
	zstd iproute2 util-linux openssl systemd-boot-efi
QEMU_TESTS ?= qemu --ignore=qemu/arm64 --ignore=qemu/test_qemu_operator.py --ignore=qemu/test_qemu_staged.py# the operator rollback, the staged update: on demand
QEMU_PULLS ?= 5# plug pulls in the campaign scenario (QEMU_PULL_SEED=N repeats a printed draw)
qemu-deps:
	@missing=""; for pkg in $(QEMU_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

qemu-image: qemu-deps deb $(STAMP)
	PATH="$$PATH:/usr/sbin:/sbin" DEB=$(abspath $(DEB_FILE)) OMAHA_AGENT=$(abspath $(VENV))/bin/omaha-agent bash qemu/build-image.sh

# Inside a new network namespace with only lo: the dev server and QEMU's user network stay on this machine.
# the systemd-boot twin of the image (README "QEMU test (amd64-generic image)"); its success scenario runs in
# qemu-test, the rollback and the power cut with qemu-test-sdboot
qemu-image-sdboot: qemu-deps deb $(STAMP)
	PATH="$$PATH:/usr/sbin:/sbin" DEB=$(abspath $(DEB_FILE)) OMAHA_AGENT=$(abspath $(VENV))/bin/omaha-agent BOOTLOADER=systemd-boot bash qemu/build-image.sh

# the slot-groups twin (a root filesystem and a kernel partition per slot; README "QEMU test (amd64-generic
# image)"): its scenario runs in qemu-test
qemu-image-groups: qemu-deps deb $(STAMP)
	PATH="$$PATH:/usr/sbin:/sbin" DEB=$(abspath $(DEB_FILE)) OMAHA_AGENT=$(abspath $(VENV))/bin/omaha-agent LAYOUT=groups bash qemu/build-image.sh

qemu-test-sdboot: qemu-image-sdboot
	PATH="$$PATH:/usr/sbin:/sbin" QEMU_SDBOOT_ALL=1 unshare -n -- sh -c 'ip link set lo up && exec $(PY) -m pytest -s qemu/test_qemu_sdboot.py $(PYTEST_ARGS)'

qemu-test: qemu-image qemu-image-sdboot qemu-image-groups
	PATH="$$PATH:/usr/sbin:/sbin" QEMU_PULLS=$(QEMU_PULLS) unshare -n -- sh -c 'ip link set lo up && exec $(PY) -m pytest -s $(QEMU_TESTS) $(PYTEST_ARGS)'

# The QEMU aarch64 (virt, U-Boot) image and its boot test (root; see README "QEMU test (arm64, U-Boot)"): the
# rootfs is built under qemu-user through binfmt_misc.
QEMU_ARM64_PACKAGES := qemu-system-arm u-boot-qemu u-boot-tools qemu-user-static binfmt-support mmdebstrap arch-test \
	dosfstools mtools fdisk e2fsprogs zstd iproute2 util-linux openssl libubootenv-tool
QEMU_ARM64_TESTS ?= qemu/arm64
qemu-deps-arm64:
	@missing=""; for pkg in $(QEMU_ARM64_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

qemu-image-arm64: qemu-deps-arm64 deb $(STAMP)
	PATH="$$PATH:/usr/sbin:/sbin" DEB=$(abspath $(DEB_FILE)) OMAHA_AGENT=$(abspath $(VENV))/bin/omaha-agent bash qemu/build-image-arm64.sh

qemu-test-arm64: qemu-image-arm64
	PATH="$$PATH:/usr/sbin:/sbin" unshare -n -- sh -c 'ip link set lo up && exec $(PY) -m pytest -s $(QEMU_ARM64_TESTS) $(PYTEST_ARGS)'

demo: $(STAMP)
	$(VENV)/bin/omaha-agent demo

# Figures, not pass/fail: the agent against the machine's limit and a shell pipeline, CPU, memory, latency,
# a fleet (see tests/bench.py). Also needs nginx (it serves the payloads), curl and openssl (the baselines).
# BENCH_MIB=size, BENCH_QUICK=1 for a reduced set, BENCH_OUT=file.json for the figures as JSON; the adaptive
# figures build a Debian image pair once (mmdebstrap, root; cached under build/adaptive/), BENCH_ADAPTIVE=0 skips them.
bench: SYSTEM_TOOLS += nginx:nginx curl:curl openssl:openssl mke2fs:e2fsprogs mmdebstrap:mmdebstrap
bench: system-deps $(STAMP)
	PATH="$$PATH:/usr/sbin:/sbin" $(PY) -m tests.bench

clean:
	rm -rf $(VENV) build .pytest_cache

# Puts the agent, its units, D-Bus files and default config in place (DESTDIR for an image's root), for
# distributions other than Debian (on Debian: make deb, then apt install ./build/deb/omaha-agent_*_all.deb).
# Runtime dependencies come from the distribution: python3-aiohttp python3-defusedxml python3-yaml
# python3-dbus-next python3-pyudev python3-cryptography (Debian names). Then: systemctl enable omaha-agent omaha-agent-confirm
DESTDIR ?=
PREFIX ?= /usr
PYTHONDIR ?= $(PREFIX)/lib/python3/dist-packages
install:
	install -d $(DESTDIR)$(PYTHONDIR)/agent $(DESTDIR)$(PREFIX)/bin
	cd agent && find . -name '*.py' -exec install -D -m 0644 {} $(DESTDIR)$(PYTHONDIR)/agent/{} \;
	printf '#!/usr/bin/python3\nimport sys\nfrom agent.cli import main\nsys.exit(main())\n' > $(DESTDIR)$(PREFIX)/bin/omaha-agent
	chmod 0755 $(DESTDIR)$(PREFIX)/bin/omaha-agent
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/lib/systemd/system systemd/omaha-agent.service systemd/omaha-agent-confirm.service
	install -D -m 0644 systemd/org.omaha_agent.Agent1.service $(DESTDIR)$(PREFIX)/share/dbus-1/system-services/org.omaha_agent.Agent1.service
	install -D -m 0644 config/dbus/org.omaha_agent.Agent1.conf $(DESTDIR)$(PREFIX)/share/dbus-1/system.d/org.omaha_agent.Agent1.conf
	install -D -m 0644 systemd/omaha-agent.tmpfiles $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/omaha-agent.conf
	install -D -m 0644 systemd/omaha-agent.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/omaha-agent.conf
	install -D -m 0644 config/grub/grub.cfg $(DESTDIR)$(PREFIX)/share/omaha-agent/grub.cfg
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/omaha-agent/uboot config/uboot/boot.cmd config/uboot/fw_env.config
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/omaha-agent/README.md
	install -d -m 0755 $(DESTDIR)/etc/omaha-agent/keys
	test -e $(DESTDIR)/etc/omaha-agent/agent.yaml || install -D -m 0644 config/agent.yaml $(DESTDIR)/etc/omaha-agent/agent.yaml

# The Debian package (README "Install on Debian"): build/deb/omaha-agent_<version>_all.deb from debian/ with
# debhelper and dh-python (pybuild), built from a copy of the source tree so the tree stays clean; lintian must
# report no errors. Reproducible: SOURCE_DATE_EPOCH (default: debian/changelog's date) sets every timestamp.
DEB_BUILD_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel \
	dpkg-dev lintian
DEB_DIR ?= build/deb
DEB_VERSION = $(shell dpkg-parsechangelog -l debian/changelog -S Version)
DEB_FILE = $(DEB_DIR)/omaha-agent_$(DEB_VERSION)_all.deb
deb-deps:
	@missing=""; for pkg in $(DEB_BUILD_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing packages to build the .deb:$$missing (run as root or install them)" >&2; exit 1; fi; \
	fi

deb-package: deb-deps
	@rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/omaha-agent
	@tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude=__pycache__ \
	  --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.hypothesis . | tar -C $(DEB_DIR)/omaha-agent -xf -
	@# Debian's own python3 and tools, whatever else the PATH holds (a pyenv python has no dh-python modules)
	@cd $(DEB_DIR)/omaha-agent && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b -us -uc --no-sign >../build.log 2>&1 || \
	  { tail -n 40 ../build.log >&2; echo "make deb: dpkg-buildpackage failed (the whole log: $(DEB_DIR)/build.log)" >&2; exit 1; }
	@rm -rf $(DEB_DIR)/omaha-agent
	@echo "built $(DEB_FILE)"

deb: deb-package
	@lintian --fail-on error $(DEB_FILE) > $(DEB_DIR)/lintian.txt 2>&1; status=$$?; cat $(DEB_DIR)/lintian.txt; \
	echo "lintian: $$(grep -c '^E:' $(DEB_DIR)/lintian.txt) errors, $$(grep -c '^W:' $(DEB_DIR)/lintian.txt) warnings"; \
	exit $$status

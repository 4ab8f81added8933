# The README's commands. Each target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages whose tools the tests use for real (grub-editenv, sfdisk, fw_setenv, dbus-daemon, systemd-analyze)
SYSTEM_TOOLS := grub-editenv:grub-common sfdisk:fdisk fw_setenv:libubootenv-tool dbus-daemon:dbus systemd-analyze:systemd xz:xz-utils

.PHONY: test demo system-deps venv clean

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
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing system packages:$$missing (run as root or install them; the tests needing them will skip)"; fi; \
	fi

test: system-deps $(STAMP)
	PATH="$$PATH:/usr/sbin:/sbin" $(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/omaha-agent demo

clean:
	rm -rf $(VENV) build .pytest_cache

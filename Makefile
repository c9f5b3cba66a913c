# make demo   - the main job: agents measuring an ESP tunnel between two namespaces, keyed from its SAs
# make test   - install what the tests need, run host tests and real-kernel tests
# make lab     - the Vagrant lab from nothing: libvirt, an offline box, two routers with IKEv2,
#                an agent each; prints the SA pair, a measurement, metrics; then destroys it
# make lab-test - the same with assertions (IKEv2, ESP, bound agents, zero loss, rekey, Prometheus)
# make fuzz   - every fuzz target for FUZZ_RUNS inputs (tools/fuzz; atheris when installed)
# Both run as root on Debian 12 / Ubuntu 24.04 (Python >= 3.11).
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
APT_PKGS := iproute2 iputils-ping kmod busybox-static qemu-system-x86 procps \
	strongswan-charon strongswan-swanctl openssl curl prometheus ruby shellcheck vagrant vagrant-libvirt

LAB_APT_PKGS := vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients \
	qemu-system-x86 qemu-utils debootstrap dnsmasq-base iptables rsync e2fsprogs

.PHONY: demo test fuzz deps venv clean lab lab-test lab-deps
FUZZ_RUNS ?= 1000000
demo: deps venv
	tools/demo

test: deps venv
	tools/run-tests

lab: lab-deps
	tools/lab/vagrant/lab show

lab-test: lab-deps
	tools/lab/vagrant/lab test

lab-deps:
	@missing=$$(for p in $(LAB_APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

fuzz: venv
	@$(VENV)/bin/python -c 'import atheris' 2>/dev/null || $(VENV)/bin/pip install -q atheris \
		|| echo "atheris does not install here: tools/fuzz falls back to its mutation loop"
	tools/fuzz all --runs $(FUZZ_RUNS)

deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .cache results

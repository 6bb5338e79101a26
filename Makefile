# SnowFlock: VM fork for Linux clusters, on QEMU.
#
#   make deps    install what the project needs (Debian packages, .venv); idempotent
#   make demo    the main job (see README)
#   make test    every test: lint, types, man pages, unit, bats, VM integration
#   make bench   benchmarks that print tables
#   make cluster a cluster of network-namespace hosts on this machine, until ^C
#   make image   the guest image in build/image (rebuilt only when its inputs changed)
#   make image-jvm  the same with a JVM and the Java API, in build/image-jvm
#
# Parts of the suite: make test-unit, make test-bats, make test-vm, make lint.

PYTHON_SYSTEM ?= /usr/bin/python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
DEBIAN_PACKAGES := python3 python3-venv python3-dev gcc binutils make pandoc bats shellcheck \
                   xenstore-utils valgrind qemu-system-x86 busybox-static zstd cpio \
                   libfuse3-dev fuse3 zlib1g-dev pkg-config iproute2 procps iputils-ping nftables \
                   dnsmasq-base iperf3 munge slurmctld slurmd slurm-client \
                   openjdk-17-jdk-headless
MAN_SOURCES   := $(wildcard man/*.md)
MAN_PAGES     := $(patsubst man/%.md,build/man/%,$(MAN_SOURCES))
EXECUTABLES   := $(notdir $(wildcard bin/*))

.PHONY: all c java deps deps-debian deps-python man completion image image-jvm demo test \
        test-all test-unit test-bats test-vm lint bench clean cluster

all: deps man completion c java

# C and assembly in c/, built warning-free into build/.
CFLAGS ?= -O2 -g
CFLAGS += -Wall -Wextra -Werror -std=gnu11
C_TARGETS := build/kvm-probe.bin build/libsnowflock.a build/libsnowflock.so build/sf-ctest \
             build/sf-cxxtest build/sf-cdrive build/sf-tools build/memserver build/memtap build/libnohugepage.so \
             build/libwptrack.so build/libtaphold.so

c: $(C_TARGETS)

# The functional KVM probe: a 64 KiB BIOS image that enters long mode (sflib/vm/accel.py).
build/kvm-probe.bin: c/kvm-probe.S | deps-debian
	@mkdir -p build
	$(CC) -c -o build/kvm-probe.o $<
	ld -m elf_x86_64 -Ttext=0xffff0000 --oformat binary -o $@ build/kvm-probe.o

# The C API for guests (c/snowflock.h, snowflock(3)): it speaks sfld's protocol over
# the guest agent's socket. Static and shared (position-independent either way, so
# one set of objects serves both); only the sf_* calls are exported.
LIBSF_SOURCES := c/snowflock.c c/sf-proto.c c/sf-json.c c/sf-xs.c c/sf-hooks.c c/sf-freepages.c
LIBSF_HEADERS := c/snowflock.h c/sf-proto.h c/sf-json.h c/sf-xs.h c/sf-hooks.h c/sf-call.h \
                 c/sf-freepages.h
LIBSF_OBJECTS := $(patsubst c/%.c,build/libsf/%.o,$(LIBSF_SOURCES))

build/libsf/%.o: c/%.c $(LIBSF_HEADERS) | deps-debian
	@mkdir -p build/libsf
	$(CC) $(CFLAGS) -fPIC -c -o $@ $<

build/libsnowflock.a: $(LIBSF_OBJECTS)
	rm -f $@
	$(AR) rcs $@ $^

build/libsnowflock.so.0: $(LIBSF_OBJECTS)
	$(CC) $(CFLAGS) -shared -Wl,-soname,libsnowflock.so.0 -Wl,-z,defs -o $@ $^ -lz

build/libsnowflock.so: build/libsnowflock.so.0
	ln -sf libsnowflock.so.0 $@

# Static, so they run in any guest whatever its libraries (test_c_api.py puts them in one).
build/sf-ctest: c/sf-ctest.c c/snowflock.h build/libsnowflock.a
	$(CC) $(CFLAGS) -static -o $@ $< build/libsnowflock.a -lz

# The guest tools in C (sf-ticket, sf-clone, ... as one executable: sf-tools.c), static so
# that they run in any guest; the image links each tool's name to it.
TOOLS_SOURCES := c/sf-tools.c c/sf-cli.c c/sf-share.c
build/sf-tools: $(TOOLS_SOURCES) c/sf-cli.h c/sf-share.h $(LIBSF_HEADERS) build/libsnowflock.a
	$(CC) $(CFLAGS) -static -o $@ $(TOOLS_SOURCES) build/libsnowflock.a -lz

# A command-line driver of the calls, linked to the shared library (test_c_agent.py).
build/sf-cdrive: c/sf-cdrive.c c/snowflock.h build/libsnowflock.so
	$(CC) $(CFLAGS) -pthread -o $@ $< -Lbuild -lsnowflock -Wl,-rpath,'$$ORIGIN'

CXXFLAGS ?= -O2 -g
CXXFLAGS += -Wall -Wextra -Werror -std=c++17
build/sf-cxxtest: c/sf-cxxtest.cpp c/snowflock.hpp c/snowflock.h build/libsnowflock.a
	$(CXX) $(CXXFLAGS) -static -o $@ $< build/libsnowflock.a -lz

# The Java API (java/src, snowflock.3java): pure Java over the agent's socket, no JNA.
# build/snowflock.jar is the library; build/snowflock-test.jar the programs the tests
# run with it (test_java_agent.py on this machine's JVM, test_java_api.py in a guest).
JAVA_SOURCES      := $(wildcard java/src/org/snowflock/*.java)
JAVA_TEST_SOURCES := $(wildcard java/test/org/snowflock/test/*.java)
# String concatenation compiled inline, not through invokedynamic: a JVM under TCG
# spends a good part of a second bootstrapping that on its first call.
JAVACFLAGS        ?= --release 17 -Xlint:all -Werror -encoding UTF-8 -XDstringConcat=inline
JAR_DATE          := 2026-01-01T00:00:00Z

java: build/snowflock.jar build/snowflock-test.jar

build/snowflock.jar: $(JAVA_SOURCES) | deps-debian
	rm -rf build/java/classes && mkdir -p build/java/classes
	javac $(JAVACFLAGS) -d build/java/classes $(JAVA_SOURCES)
	jar --create --date=$(JAR_DATE) --file $@ -C build/java/classes .

build/snowflock-test.jar: $(JAVA_TEST_SOURCES) build/snowflock.jar
	rm -rf build/java/test-classes && mkdir -p build/java/test-classes
	javac $(JAVACFLAGS) -cp build/snowflock.jar -d build/java/test-classes $(JAVA_TEST_SOURCES)
	jar --create --date=$(JAR_DATE) --file $@ -C build/java/test-classes .

# The memory server and memtap (DESIGN §2 step 4), speaking c/memproto.h.
build/memserver: c/memserver.c c/memproto.h | deps-debian
	@mkdir -p build
	$(CC) $(CFLAGS) -o $@ c/memserver.c

build/memtap: c/memtap.c c/memproto.h | deps-debian
	@mkdir -p build
	$(CC) $(CFLAGS) $$(pkg-config --cflags fuse3) -o $@ c/memtap.c $$(pkg-config --libs fuse3)

# Preloaded into QEMUs whose RAM is a memtap file (see the file for why).
build/libnohugepage.so: c/nohugepage.c | deps-debian
	@mkdir -p build
	$(CC) $(CFLAGS) -shared -fPIC -o $@ $<

build/libwptrack.so: c/wptrack.c
	@mkdir -p build
	$(CC) $(CFLAGS) -shared -fPIC -o $@ $<

# Preloaded into every QEMU with a network card: it shares the card's tap with its
# VM's other QEMU without touching what that one uses (see the file for how).
build/libtaphold.so: c/taphold.c
	@mkdir -p build
	$(CC) $(CFLAGS) -shared -fPIC -o $@ $< -ldl

build/sf-unittest: c/sf-unittest.c $(LIBSF_HEADERS) build/libsnowflock.a
	$(CC) $(CFLAGS) -pthread -o $@ $< build/libsnowflock.a -lz

# The C API's JSON, messages, hooks and XenStore client without a VM, under valgrind
# (the calls against real servers: tests/integration/test_c_agent.py).
.PHONY: test-c
test-c: build/sf-unittest
	valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
		--trace-children=no build/sf-unittest

deps: deps-debian deps-python

# Only calls apt-get when a package is missing, so a second run is a no-op.
deps-debian:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' \
	    || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "+ apt-get install $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

deps-python: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | deps-debian
	[ -x $(PY) ] || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

man: $(MAN_PAGES)

build/man/%: man/%.md | deps-debian
	@mkdir -p build/man
	pandoc --standalone --to man $< -o $@

completion: deps-python
	$(PY) -m sflib.cli.completion --out completion/bash $(EXECUTABLES)

# The guest image (sf-image(1)); sf-image itself skips a build whose inputs are unchanged.
image: deps build/libsnowflock.so build/libsnowflock.a
	bin/sf-image build

image-jvm: deps build/libsnowflock.so build/libsnowflock.a build/snowflock.jar
	bin/sf-image build --jvm

# Every target a newcomer runs on a fresh clone builds what it uses: sfld needs the KVM
# probe (c), clones the memory server, memtap and libnohugepage.so (c), and VMs an image
# (the demo and the VM tests build their own).
demo: deps man c
	$(PY) -m sflib.demo

lint: deps-python
	$(VENV)/bin/ruff check sflib snowflock tests bench
	$(VENV)/bin/ruff format --check sflib snowflock tests bench
	$(VENV)/bin/mypy
	shellcheck -x .ci/run sflib/cli/launcher.sh tests/bats/*.bash completion/bash/* \
	    hooks.d/*/* demo/*.sh sflib/image/guest-init.sh sflib/image/udhcpc.script
	$(PY) -m sflib.cli.completion --check completion/bash $(EXECUTABLES)

test-unit: deps-python
	$(PY) -m pytest -m 'not vm' -q

# The guest tools' bats tests run twice: the Python tools, then the C ones the image ships.
GUEST_TOOLS := $(shell $(PYTHON_SYSTEM) -c 'import sys; sys.path[:0] = ["."]; \
                 from sflib.cli import GUEST_TOOLS; print(*GUEST_TOOLS)' 2>/dev/null)
test-bats: deps man build/sf-tools
	PATH=$(CURDIR)/bin:$$PATH bats tests/bats
	rm -rf build/guest-bin && mkdir -p build/guest-bin
	for tool in $(GUEST_TOOLS); do ln -s ../sf-tools build/guest-bin/$$tool; done
	PATH=$(CURDIR)/build/guest-bin:$(CURDIR)/bin:$$PATH bats tests/bats/guest-tools.bats

test-vm: deps c java
	$(PY) -m pytest -m vm -q

test-all: deps c java
	$(PY) -m pytest -q

test: deps man c java lint test-c test-bats test-all

# A cluster of network-namespace hosts on this machine, until ^C (sf-testcluster(8)).
cluster: deps man c image
	bin/sf-testcluster run --hosts 3

bench: deps c image
	$(PY) bench/xenstore_bench.py
	$(PY) bench/vm_bench.py
	$(PY) bench/fork_bench.py
	$(PY) bench/remote_bench.py
	$(PY) bench/net_bench.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache

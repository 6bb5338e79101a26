"""One table of settings feeding sfld's command-line options, TOML keys,
environment variables, completion and the man page.

Precedence: defaults < config file < environment (SF_<KEY>) < command line.
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sflib.errors import UsageError
from sflib.paths import BUILD_DIR, Paths

LOOP_STALL_WARNING = 0.1  # seconds: a daemon's loop held up longer is logged (sflib.looplag)


class PortList(tuple[int, ...]):
    """TCP ports, from "22,80" or a TOML list. Raises ValueError."""

    def __new__(cls, value: object = ()) -> PortList:
        if isinstance(value, str):
            items: list[object] = [v for v in value.replace(" ", "").split(",") if v]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise TypeError(value)
        ports = tuple(int(str(v)) for v in items)
        if any(not 0 < p < 65536 for p in ports):
            raise ValueError(value)
        return super().__new__(cls, sorted(set(ports)))

    def __str__(self) -> str:
        return ",".join(map(str, self))


@dataclass(frozen=True)
class Setting:
    key: str  # TOML key under [sfld]; option --key-with-dashes; variable SF_KEY
    type: type
    default: Callable[[Paths], Any]
    help: str
    choices: tuple[str, ...] = ()
    positive: bool = True  # False: 0 is allowed too (it means "none")

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return "SF_" + self.key.upper()

    def parse(self, value: object, origin: str) -> Any:
        """value converted to this setting's type. Raises UsageError naming origin."""
        try:
            if self.type is bool and isinstance(value, str):
                result: Any = _parse_bool(value)
            elif self.type is Path:
                result = Path(str(value))
            else:
                result = self.type(value)
        except (TypeError, ValueError):
            kind = _KINDS.get(self.type, self.type.__name__)
            raise UsageError(f"{origin}: {self.key} must be {kind}, not {value!r}") from None
        if self.choices and result not in self.choices:
            raise UsageError(f"{origin}: {self.key} must be one of {', '.join(self.choices)}")
        if self.type in (int, float) and (result <= 0 if self.positive else result < 0):
            kind = "positive" if self.positive else "0 or more"
            raise UsageError(f"{origin}: {self.key} must be {kind}")
        return result


# fmt: off
_KINDS = {int: "an integer", float: "a number", str: "a string", Path: "a path",
          bool: "true or false", PortList: "a list of ports from 1 to 65535"}  # fmt: skip


def _parse_bool(text: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


SFLD_SETTINGS: tuple[Setting, ...] = (
    Setting("state_dir", Path, lambda p: p.state_dir, "Where sfld keeps its state."),
    Setting("run_dir", Path, lambda p: p.run_dir, "Where sfld puts its sockets."),
    Setting("memory_dir", Path, lambda p: p.memory_dir, "tmpfs folder for guest RAM files."),
    Setting(
        "image_dir",
        Path,
        lambda p: BUILD_DIR / "image",
        "The guest image (vmlinuz, initrd.img) VMs boot by default.",
    ),
    Setting("qemu", str, lambda p: "qemu-system-x86_64", "The QEMU program."),
    Setting(
        "accel",
        str,
        lambda p: "auto",
        "Accelerator: auto probes KVM, else TCG.",
        ("auto", "kvm", "tcg"),
    ),
    Setting("memory", int, lambda p: 256, "Default guest RAM in MiB."),
    Setting("vcpus", int, lambda p: 1, "Default number of vCPUs."),
    Setting("max_vms", int, lambda p: 32, "Most VMs this host runs at once."),
    Setting(
        "max_clones", int, lambda p: 8, "Clone slots of this host: tickets are granted from them."
    ),
    Setting(
        "host_name",
        str,
        lambda p: socket.gethostname(),
        "This host's name in the cluster (unique).",
    ),
    Setting(
        "master",
        str,
        lambda p: "",
        "sfmasterd's HOST:PORT; empty: this host alone grants tickets for itself.",
    ),
    Setting(
        "peer_listen",
        str,
        lambda p: "127.0.0.1:0",
        "HOST:PORT where other hosts' sflds reach this one (port 0: any free).",
    ),
    Setting(
        "clone_memory",
        str,
        lambda p: "local",
        "How this host's clones reach a checkpoint's memory: local maps the frozen image; "
        "memtap fetches it through the memory server, as a clone on another host does.",
        ("local", "memtap"),
    ),
    Setting(
        "standby",
        bool,
        lambda p: True,
        "Start each VM's next QEMU before its next fork (once it is ready, and after "
        "each fork), so that sf-clone does not wait for it; costs a paused QEMU per VM.",
    ),
    Setting(
        "memserver_listen",
        str,
        lambda p: "127.0.0.1:0",
        "HOST:PORT where the memory server serves this host's images (port 0: any free).",
    ),
    Setting(
        "memtap_prefetch",
        int,
        lambda p: 8,
        "Pages memtap fetches past each missing page it is asked for (0: none).",
        positive=False,
    ),
    Setting(
        "memtap_timeout",
        float,
        lambda p: 10.0,
        "Seconds memtap waits for an answer from the memory server; it reconnects once, "
        "so a read fails within about twice this.",
    ),
    Setting(
        "secret_file",
        Path,
        lambda p: p.secret_file,
        "The cluster's shared secret, the same on every host (made if missing and alone).",
    ),
    Setting(
        "ready_timeout",
        float,
        lambda p: 300.0,
        "Seconds a VM may take from start to ready before it is stopped.",
    ),
    Setting(
        "network",
        str,
        lambda p: "family",
        "family: every VM gets a card on its family's private network; none: no card.",
        ("family", "none"),
    ),
    Setting(
        "router",
        str,
        lambda p: "distributed",
        "Where a family's NAT, firewall and bandwidth limit run: on every host with "
        "members (distributed), or in one router namespace on the parent's host (central).",
        ("distributed", "central"),
    ),
    Setting(
        "inbound_ports",
        PortList,
        lambda p: PortList(""),
        "TCP ports of every family member open to inbound connections (comma-separated); "
        "the parent accepts any.",
    ),
    Setting(
        "bandwidth",
        int,
        lambda p: 0,
        "Mbit/s each way between a family and the outside (0: no limit).",
        positive=False,
    ),
    Setting(
        "loop_stall_warning",
        float,
        lambda p: LOOP_STALL_WARNING,
        "sfld logs a warning when its event loop is held up longer than this (seconds).",
    ),
)
# fmt: on


def resolve(
    settings: tuple[Setting, ...],
    paths: Paths,
    config_file: Path | None,
    cli: Mapping[str, object],
    environ: Mapping[str, str] | None = None,
    table: str = "sfld",
) -> dict[str, Any]:
    """Every setting's value. An explicit config_file must exist; the default
    ($SF_ROOTDIR/etc/snowflock/<table>.toml) need not."""
    env = os.environ if environ is None else environ
    values = {s.key: s.default(paths) for s in settings}
    default_file = paths.config_file.with_name(f"{table}.toml")
    values.update(_from_file(settings, config_file or default_file, config_file is not None, table))
    for s in settings:
        if s.env in env:
            values[s.key] = s.parse(env[s.env], f"${s.env}")
        if cli.get(s.key) is not None:
            values[s.key] = s.parse(cli[s.key], s.option)
    return values


def _from_file(
    settings: tuple[Setting, ...], path: Path, required: bool, table_name: str
) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise UsageError(f"config file {path} does not exist") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: {e}") from e
    table = data.get(table_name, {})
    unknown = set(data) - {table_name} | set(table) - {s.key for s in settings}
    if unknown:
        raise UsageError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}")
    by_key = {s.key: s for s in settings}
    return {k: by_key[k].parse(v, str(path)) for k, v in table.items()}


def to_toml(settings: tuple[Setting, ...], values: Mapping[str, Any], table: str = "sfld") -> str:
    """The effective configuration as a config file would say it."""
    return f"[{table}]\n" + "".join(f"{s.key} = {_toml_value(values[s.key])}\n" for s in settings)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, PortList):
        return f"[{', '.join(map(str, value))}]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


# fmt: off
MASTER_SETTINGS: tuple[Setting, ...] = (
    Setting("listen", str, lambda p: "127.0.0.1:7000",
            "HOST:PORT where the hosts' sflds reach the master."),
    Setting("state_dir", Path, lambda p: p.master_state_dir,
            "Where the master keeps its database (master.db)."),
    Setting("secret_file", Path, lambda p: p.secret_file,
            "The cluster's shared secret, the same on every host (must exist)."),
    Setting("heartbeat", float, lambda p: 1.0, "Seconds between a host's heartbeats."),
    Setting("host_timeout", float, lambda p: 5.0,
            "A host silent this long is dead: its slots and its clones are lost."),
    Setting("allocator", str, lambda p: "embedded",
            "Who grants tickets: the embedded allocator (hosts' slots), or Slurm.",
            ("embedded", "slurm")),
    Setting("max_family_clones", int, lambda p: 0,
            "Most clones one parent holds across its live tickets (0: no limit).",
            positive=False),
    Setting("max_host_clones", int, lambda p: 0,
            "Most clones the parents of one host hold across their live tickets "
            "(0: no limit).", positive=False),
    Setting("slurm_partition", str, lambda p: "",
            "The Slurm partition of ticket jobs (empty: Slurm's default)."),
    Setting("slurm_account", str, lambda p: "",
            "The Slurm account ticket jobs are charged to (empty: the user's default)."),
    Setting("slurm_nodes", str, lambda p: "",
            "NODE=HOST,... for Slurm nodes not named after their sfld host."),
    Setting("loop_stall_warning", float, lambda p: LOOP_STALL_WARNING,
            "The master logs a warning when its event loop is held up longer than this "
            "(seconds)."),
)
# fmt: on

# fmt: off
GUESTD_SETTINGS: tuple[Setting, ...] = (
    Setting("xenbus_port", Path, lambda p: Path("/dev/virtio-ports/org.snowflock.xenbus"),
            "The guest's XenStore port (virtio-serial), or a XenStore server's Unix socket."),
    Setting("xenstored_socket", Path, lambda p: Path("/run/xenstored/socket"),
            "Where guest programs connect: Xen's xenstored socket, pyxs's default."),
    Setting("socket_mode", str, lambda p: "0600",
            "The socket's permissions, in octal: who in the guest may use the API."),
)
# fmt: on

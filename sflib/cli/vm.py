"""sf-vm: start, list, watch and stop the VMs of the local sfld."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sflib.cli.app import (
    DebugOption,
    JsonOption,
    QuietOption,
    SocketOption,
    main,
    make_app,
    print_result,
    setup_logging,
)
from sflib.errors import NotFoundError
from sflib.paths import Paths
from sflib.sfld.control import ControlClient

PROGRAM = "sf-vm"
app = make_app("Start, list, watch and stop the VMs of the local sfld.")
NameArg = Annotated[str, typer.Argument(help="The VM's name.")]


class _Context:
    client: ControlClient


@app.callback()
def options(
    socket: SocketOption = None,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Start, list, watch and stop the VMs of the local sfld."""
    setup_logging(PROGRAM, debug, quiet)
    _Context.client = ControlClient(socket or Paths.from_env().control_socket)


@app.command()
def run(
    name: Annotated[str | None, typer.Option("--name", "-n", help="Name [default: vmN].")] = None,
    memory: Annotated[int | None, typer.Option("--memory", "-m", help="RAM in MiB.")] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus", help="Number of vCPUs.")] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="Image folder [default: sfld's image_dir].")
    ] = None,
    append: Annotated[str, typer.Option("--append", help="Extra kernel command line.")] = "",
    wait_ready: Annotated[
        bool, typer.Option("--wait-ready", help="Return once the guest is ready.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds --wait-ready waits.", min=0.1)
    ] = 300.0,
    show_command: Annotated[
        bool, typer.Option("--show-command", help="Print the QEMU command line; start nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Boot a VM; print its name (or, with --json, its description)."""
    args = {"name": name, "memory_mib": memory, "vcpus": vcpus, "append": append,
            "image": str(image.absolute()) if image else None}  # fmt: skip
    args = {k: v for k, v in args.items() if v is not None}
    client = _Context.client
    if show_command:
        print(client.call("vm.command", **args))
        return
    info = client.call("vm.run", **args)
    if wait_ready:
        info = client.call("vm.wait_ready", name=info["name"], timeout=timeout)
    print_result(info, as_json, info["name"])


@app.command("ls")
def list_vms(as_json: JsonOption = False) -> None:
    """List the running VMs."""
    vms = _Context.client.call("vm.list")
    if as_json:
        print(json.dumps(vms, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "DOMID", "STATE", "ACCEL", "MEMORY", "VCPUS", "PID", "UPTIME"):
        table.add_column(column)
    for vm in vms:
        table.add_row(vm["name"], str(vm["domid"]), vm["state"], vm["accel"],
                      f"{vm['memory_mib']} MiB", str(vm["vcpus"]), str(vm["pid"]),
                      f"{vm['uptime_s']:.0f} s")  # fmt: skip
    Console(width=200).print(table)


@app.command()
def logs(
    name: NameArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output.")
    ] = False,
) -> None:
    """Print a VM's serial console output."""
    client = _Context.client
    path = Path(client.call("vm.info", name=name)["console_log"])
    with path.open("rb") as console:
        while True:
            chunk = console.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                continue
            if not follow or not _alive(client, name):
                return
            time.sleep(0.2)


def _alive(client: ControlClient, name: str) -> bool:
    try:
        client.call("vm.info", name=name)
    except NotFoundError:
        return False
    return True


@app.command()
def stop(
    names: Annotated[list[str], typer.Argument(help="VMs to stop.")], as_json: JsonOption = False
) -> None:
    """Stop VMs and remove their files."""
    stopped = [_Context.client.call("vm.stop", name=name) for name in names]
    print_result(stopped, as_json, "\n".join(vm["name"] for vm in stopped))


@app.command()
def checkpoints(as_json: JsonOption = False) -> None:
    """List the checkpoints VMs made with sf-checkpoint."""
    found = _Context.client.call("checkpoint.list")
    text = "\n".join(f"{c['checkpoint']} {c['owner']} {c['pause_ms']} ms" for c in found)
    print_result(found, as_json, text)


@app.command()
def describe(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint, as sf-vm checkpoints lists.")],
) -> None:
    """Print a checkpoint's descriptor manifest (JSON; see sfld(8))."""
    print(json.dumps(_Context.client.call("checkpoint.describe", checkpoint=checkpoint), indent=2))


@app.command()
def tickets(as_json: JsonOption = False) -> None:
    """List tickets: their owner, state, clones and the parent's pause."""
    found = _Context.client.call("ticket.list")
    lines = [f"{t['ticket']} {t['owner']} {t['state']} {t['granted']}/{t['requested']} "
             f"pause={t['pause_ms']}ms" for t in found]  # fmt: skip
    print_result(found, as_json, "\n".join(lines))


@app.command()
def memory(as_json: JsonOption = False) -> None:
    """Show the memory server's address and the memtap mounts of this host's clones."""
    info = _Context.client.call("memory.stats")
    lines = [f"memserver: {info['memserver'] or '-'}"]
    lines += [f"tap {t['image']} from {t['server']}: {t.get('pages_cached', '?')}/"
              f"{t.get('pages', '?')} pages cached, {t.get('pages_fetched', '?')} fetched, "
              f"users {' '.join(t['users'])}" for t in info["taps"]]  # fmt: skip
    print_result(info, as_json, "\n".join(lines))


@app.command()
def network(as_json: JsonOption = False) -> None:
    """Show the family networks on this host: bridge, other hosts, members."""
    info = _Context.client.call("network.status")
    lines = [f"network: {info['network']}, router: {info['router']}"]
    lines += [f"family {f['family']} on {f['bridge']}: members "
              f"{' '.join(map(str, f['members'])) or '-'}; other hosts "
              f"{' '.join(f['peers']) or '-'}" for f in info["families"]]  # fmt: skip
    print_result(info, as_json, "\n".join(lines))


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Show sfld's version, accelerator and VM count."""
    info = _Context.client.call("status")
    print_result(info, as_json)


if __name__ == "__main__":
    main(PROGRAM, app)

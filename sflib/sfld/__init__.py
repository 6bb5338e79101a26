"""sfld, the SnowFlock local daemon: owns the host's XenStore and its VMs.

config: the daemon's settings. control: its control protocol (codec, server,
client). vms: the table of VMs it runs. daemon: the whole, started by sflib.cli.sfld.
"""

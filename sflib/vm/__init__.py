"""VMs on QEMU: the accelerator probe, QEMU's command line (pure), and a running
machine (process, QMP, runtime files) as a managed object."""

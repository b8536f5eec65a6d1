"""Readers of the running kernel and OS: /proc, /sys, tracefs, BTF, netlink, netns."""

"""The process that serves fgc_bank banks over ZeroMQ. No math of its own: see fgc_bank.service."""

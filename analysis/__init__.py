"""Correlate memslot generations with MMIO fault latency (no root, no bcc)."""

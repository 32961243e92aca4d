"""JAX tests: two host devices (for sharding) and float64 enabled (SPEC's float64 parity).

Both must be set before JAX initialises its backend; float32 arrays stay float32.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()

import jax

jax.config.update("jax_enable_x64", True)

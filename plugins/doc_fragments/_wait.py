# Copyright: llmpods maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

# Options of a wait loop. Paired 1:1 with WAIT_SPEC in plugins/module_utils/_model_ready.py:
# change both together.

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  wait_timeout:
    description:
      - How long in seconds to wait, all stages together, before giving up.
      - The time is measured on a monotonic clock, so a change of the system clock does not shorten or
        stretch the wait.
      - Every stage is asked at least once, even when an earlier stage used up the time.
      - V(0) asks each stage once and does not retry.
    type: int
    default: 300
  wait_sleep:
    description:
      - Number of seconds to sleep between two attempts at a stage.
      - The next stage starts as soon as the current one succeeds, without sleeping.
    type: float
    default: 2.0
"""

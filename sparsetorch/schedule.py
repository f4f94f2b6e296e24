r"""When topology updates happen and how much they drop: pure functions of the step.

Optimizer steps are counted ``k = 1, 2, ...``. After step ``k`` an update runs iff

.. math::
    k \bmod \text{update\_interval} = 0 \quad\text{and}\quad
    \text{begin\_step} \le k < \text{end\_step}

and drops ``int(n_active * drop_fraction_at(k))`` weights of each tensor, with the
cosine decay of Evci et al. 2020 (https://arxiv.org/abs/1911.11134):

.. math::
    f(k) = \frac{f_0}{2}\left(1 + \cos\frac{\pi (k - \text{begin\_step})}
           {\text{end\_step} - \text{begin\_step}}\right)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DROP_SCHEDULES", "Schedule"]

DROP_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """When updates happen and which fraction of active weights each one drops.

    Args:
        update_interval: optimizer steps between updates. Default: ``100``.
        begin_step: first step that may update. Default: ``0``.
        end_step: updates stop before this step. Default: ``None`` (never
            updates: a static topology).
        drop_fraction: fraction of active weights dropped at ``begin_step``.
            Default: ``0.3``.
        drop_schedule: ``"cosine"``, ``"linear"`` (decay to 0 at ``end_step``)
            or ``"constant"``. Default: ``"cosine"``.

    Example::

        >>> s = Schedule(update_interval=25, end_step=100, drop_fraction=0.3)
        >>> [k for k in range(1, 201) if s.is_update_step(k)]
        [25, 50, 75]
        >>> print(s.table(range(0, 101, 25)))
        step  update  drop_fraction
           0      no         0.3000
          25     yes         0.2561
          50     yes         0.1500
          75     yes         0.0439
         100      no         0.0000
    """

    update_interval: int = 100
    begin_step: int = 0
    end_step: int | None = None
    drop_fraction: float = 0.3
    drop_schedule: str = "cosine"

    def __post_init__(self) -> None:
        for name in ("update_interval", "begin_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}.")
        if self.update_interval < 1:
            raise ValueError(
                f"update_interval must be >= 1, got {self.update_interval}."
            )
        if self.begin_step < 0:
            raise ValueError(f"begin_step must be >= 0, got {self.begin_step}.")
        if self.end_step is not None:
            if isinstance(self.end_step, bool) or not isinstance(self.end_step, int):
                raise TypeError(f"end_step must be an int, got {self.end_step!r}.")
            if self.end_step <= self.begin_step:
                raise ValueError(
                    f"end_step ({self.end_step}) must be greater than begin_step "
                    f"({self.begin_step})."
                )
        if isinstance(self.drop_fraction, bool) or not isinstance(
            self.drop_fraction, (int, float)
        ):
            raise TypeError(
                f"drop_fraction must be a float, got {self.drop_fraction!r}."
            )
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(
                f"drop_fraction must be in [0, 1], got {self.drop_fraction}."
            )
        if self.drop_schedule not in DROP_SCHEDULES:
            raise ValueError(
                f"Unknown drop_schedule {self.drop_schedule!r}.\n"
                f"Known drop schedules: {sorted(DROP_SCHEDULES)}."
            )

    def is_update_step(self, step: int) -> bool:
        """Whether the topology updates right after optimizer step ``step``."""
        return (
            self.end_step is not None
            and step > 0
            and step % self.update_interval == 0
            and self.begin_step <= step < self.end_step
        )

    def drop_fraction_at(self, step: int) -> float:
        """Fraction of each tensor's active weights dropped by an update at ``step``."""
        if self.end_step is None:
            return 0.0
        span = self.end_step - self.begin_step
        progress = min(max((step - self.begin_step) / span, 0.0), 1.0)
        if self.drop_schedule == "cosine":
            return self.drop_fraction / 2 * (1 + math.cos(math.pi * progress))
        if self.drop_schedule == "linear":
            return self.drop_fraction * (1 - progress)
        return self.drop_fraction

    def table(self, steps: range) -> str:
        """Render ``is_update_step`` and ``drop_fraction_at`` over ``steps``."""
        lines = ["step  update  drop_fraction"]
        for k in steps:
            flag = "yes" if self.is_update_step(k) else "no"
            lines.append(f"{k:>4}  {flag:>6}  {self.drop_fraction_at(k):>13.4f}")
        return "\n".join(lines)

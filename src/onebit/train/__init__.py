"""Training: ``onebit train`` and ``onebit.fit``."""

from onebit.train.trainer import *  # noqa: F401,F403
from onebit.train.trainer import __all__  # noqa: F401

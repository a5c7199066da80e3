"""Aggregation heads. Importing this package registers every head in ``AGGREGATORS``."""

from . import boq, cls, efficientvpr, gem, mixvpr, netvlad, salad, weiad  # noqa: F401  (registration side effects)
from .base import AGGREGATORS, Aggregator, HeadContext

__all__ = ["AGGREGATORS", "Aggregator", "HeadContext"]

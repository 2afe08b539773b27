"""Tests of the experiment scripts' helpers (scripts/experiments)."""

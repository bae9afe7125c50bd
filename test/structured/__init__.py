"""Tests for curvlinops.structured."""

"""Tests of the demo models: fetch, conversion, and the converted folders."""

"""The peer servers the benchmark compares srvit with, each a module run in its own virtual environment."""

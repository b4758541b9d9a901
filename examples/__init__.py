"""Example workflows for Tianshu."""

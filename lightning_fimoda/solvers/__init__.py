"""Solvers that apply functions of the curvature operator to vectors."""

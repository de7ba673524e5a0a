"""The ``flowforce`` command line: the only place in the package that parses argv.

Entry point: :func:`openmm_flowforce.cli.main.main`.
"""

"""Test-only code shared by the test modules (fixtures live in tests/conftest.py).

What users of asm may want as well is shipped instead: ``asm_node.testing`` and ``asm_controller.testing``.
"""

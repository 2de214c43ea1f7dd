"""The committed generated code is exactly what scripts/gen_proto.py generates."""

import subprocess

import pytest

from tests.conftest import PY, ROOT


@pytest.mark.e2e
def test_generated_protobuf_code_is_up_to_date():
    res = subprocess.run([PY, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


def test_generated_modules_are_not_a_bare_proto_package():
    import baton.pb.daemon_pb2 as d

    assert d.__name__ == "baton.pb.daemon_pb2"
    assert not (ROOT / "proto" / "__init__.py").exists()
    assert not (ROOT / "packaging" / "__init__.py").exists()

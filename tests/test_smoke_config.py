import pytest

from ropelm.config import validate
from ropelm.errors import ConfigError


def test_unknown_key_names_path_and_closest_key():
    with pytest.raises(
        ConfigError, match=r"model\.n_haed: unknown key \(did you mean 'n_head'\?\)"
    ):
        validate({"model": {"n_haed": 4}})

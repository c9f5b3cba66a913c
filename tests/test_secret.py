import logging
import pickle

import pytest

from netlink.secret import Secret

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")


def test_secret_never_shows_its_bytes(caplog):
    s = Secret(KEY)
    for text in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % s, "{}".format(s)):
        assert KEY.hex() not in text and "0011" not in text
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("t").warning("key %s %r", s, s)
    assert KEY.hex() not in caplog.text
    with pytest.raises(TypeError):
        pickle.dumps(s)


def test_secret_compare_and_fingerprint():
    assert Secret(KEY) == Secret(KEY) and Secret(KEY) != Secret(KEY[::-1])
    assert Secret(bytes(16)).is_zero and not Secret(KEY).is_zero
    assert Secret(KEY).fingerprint() == Secret(KEY).fingerprint() != Secret(KEY[::-1]).fingerprint()
    assert KEY.hex()[:12] not in Secret(KEY).fingerprint()

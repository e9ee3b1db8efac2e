"""ed25519 signature verification (RFC 8032, sections 5.1.1-5.1.7), strict, in pure Python: a bare
board has no cryptography package, and the host signs with one (edgemeta.deploy.signing)."""

import hashlib

# Points in extended coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, x*y = T/Z, on -x^2 + y^2 = 1 + d x^2 y^2.
#
# The curve's group has 8 * L points: a subgroup of prime order L, where the base point B and every
# real key and every real R (= [r]B) lie, and 8 points of small order (the identity among them). RFC
# 8032 lets a verifier take any point, and so does its cofactored equation; this one is strict
# (the "strict" column of "Taming the many EdDSAs", Chalkias et al. 2020), because a board must never take
# a signature anyone could have made:
#   - a public key or R of small order: with A = identity, R = identity and S = 0 the equation holds for
#     every message: a signature anyone can make (the identity key 0100..00 is such a key);
#   - a public key with a small-order part (mixed order, [L]A != identity): no signer's key is one, and
#     with one the equation holds or not depending on the verifier's choice of equation;
#   - an encoding that is not the canonical one of its point (y >= p; x = 0 with the sign bit set), S >= L,
#     a key or signature of the wrong length: one signature would have several spellings.
# With A and B in the prime-order subgroup, the cofactorless equation [S]B = R + [k]A checked here also
# refuses an R with a small-order part, which the cofactored one ([8][S]B = [8]R + [8][k]A) would take.

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493  # the order of the base point
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_IDENTITY = (0, 1, 1, 0)


def _add(p: tuple, q: tuple) -> tuple:
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = 2 * _D * t1 * t2 % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _double(p: tuple) -> tuple:
    x1, y1, z1, _ = p
    a, b = x1 * x1 % _P, y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1)
    g = a - b
    f = c + g
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _neg(p: tuple) -> tuple:
    return (-p[0]) % _P, p[1], p[2], (-p[3]) % _P


def _multiply(n: int, p: tuple) -> tuple:
    """[n]P, double and add (public scalars only: the time depends on n)."""
    q = _IDENTITY
    for i in range(n.bit_length() - 1, -1, -1):
        q = _double(q)
        if (n >> i) & 1:
            q = _add(q, p)
    return q


def _is_identity(p: tuple) -> bool:
    x, y, z, _ = p
    return x % _P == 0 and (y - z) % _P == 0


def _small_order(p: tuple) -> bool:
    """[8]P is the identity: P is one of the 8 points of small order (the identity included)."""
    return _is_identity(_double(_double(_double(p))))


def _decode_point(s: bytes) -> tuple | None:
    """Section 5.1.3: the point a 32-byte string encodes, or None where it encodes none or is not its
    point's canonical encoding (y >= p; x = 0 with the sign bit set): one point, one encoding."""
    if len(s) != 32:
        return None
    n = int.from_bytes(s, "little")
    x_0, y = n >> 255, n & ((1 << 255) - 1)
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P  # a candidate root of u/v
    if v * x * x % _P == (-u) % _P:
        x = x * _SQRT_M1 % _P
    if v * x * x % _P != u:
        return None
    if x == 0 and x_0:
        return None
    if x & 1 != x_0:
        x = _P - x
    return x, y, 1, x * y % _P


_B = _decode_point((4 * pow(5, _P - 2, _P) % _P).to_bytes(32, "little"))  # y = 4/5, x even


def _public_point(public_key: bytes) -> tuple[tuple | None, str]:
    """(the point, "") of a key a signer can have, else (None, why not): not 32 bytes, not the canonical
    encoding of a curve point, of small order, or not in the prime-order subgroup."""
    if len(public_key) != 32:
        return None, f"{len(public_key)} bytes, not 32"
    a = _decode_point(public_key)
    if a is None:
        return None, "not the canonical encoding of a curve point"
    if _small_order(a):
        return None, "a point of small order (such as the identity), for which anyone can sign"
    if not _is_identity(_multiply(_L, a)):
        return None, "a point outside the prime-order subgroup (of mixed order), which no signer has"
    return a, ""


def public_key_problem(public_key: bytes) -> str:
    """Why `public_key` cannot be a signer's ed25519 public key, "" when it can (see _public_point)."""
    return _public_point(public_key)[1]


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Section 5.1.7, strict: True when `signature` is `public_key`'s signature of `message` (PureEdDSA,
    Ed25519). Refused besides: a public key that public_key_problem names, an R of small order or not
    canonically encoded, S >= L (see the comment above _P for why each)."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    r, s = _decode_point(signature[:32]), int.from_bytes(signature[32:], "little")
    if r is None or _small_order(r) or s >= _L:  # (the cheap checks first)
        return False
    a = _public_point(public_key)[0]
    if a is None:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % _L
    table = {(1, 0): _B, (0, 1): _neg(a), (1, 1): _add(_B, _neg(a))}
    q = _IDENTITY  # [S]B - [k]A, both scalars walked bit by bit at once (Straus)
    for i in range(max(s.bit_length(), k.bit_length()) - 1, -1, -1):
        q = _double(q)
        bits = ((s >> i) & 1, (k >> i) & 1)
        if bits != (0, 0):
            q = _add(q, table[bits])
    return _is_identity(_add(q, _neg(r)))  # [S]B - [k]A - R: cofactorless, so R is in the subgroup too

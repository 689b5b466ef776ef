"""Reference pieces for the tokenizer tests, written independently of rlhf_jax."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode table (Radford et al. 2019's encoder.py scheme)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))

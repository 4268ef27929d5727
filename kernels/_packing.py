"""Bit-packing of integer codes, row by row, into 32-bit words: the layout ``space/_memory.py`` counts.

Code ``j`` of a row occupies bits ``[j*bits, (j+1)*bits)`` of that row's bit stream, least
significant bit first; the stream fills int32 words from their least significant bit, so a 3-bit
code may straddle two words and nothing is padded to 4 bits. A row of ``n`` codes takes
``ceil(n*bits/32)`` words.
"""

from __future__ import annotations

import math

import torch

PACKABLE_BITS = (2, 3, 4, 8)
WORD_BITS = 32


def words_per_row(n_codes: int, bits: int) -> int:
    return -(-n_codes * bits // WORD_BITS)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"packed bits must be one of {', '.join(map(str, PACKABLE_BITS))}; got {bits}")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [rows, n] (each < 2**bits) into int32 words [rows, ceil(n*bits/32)]."""
    _check_bits(bits)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D [rows, n] tensor; got shape {tuple(codes.shape)}")
    wide = codes.to(torch.int64)
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    rows, n = wide.shape
    device = codes.device
    shifts = torch.arange(bits, dtype=torch.int64, device=device)
    stream = ((wide.unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    n_words = words_per_row(n, bits)
    padded = torch.zeros(rows, n_words * WORD_BITS, dtype=torch.int64, device=device)
    padded[:, : n * bits] = stream
    weights = _powers_of_two(WORD_BITS, device)
    unsigned = (padded.view(rows, n_words, WORD_BITS) * weights).sum(-1)
    # Reinterpret the unsigned 32-bit value as the int32 with the same bits.
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 words [rows, w] → uint8 codes [rows, n_codes]."""
    _check_bits(bits)
    n_words = words.shape[1]
    if n_words != words_per_row(n_codes, bits):
        raise ValueError(f"{n_codes} codes of {bits} bits need {words_per_row(n_codes, bits)} words; got {n_words}")
    if WORD_BITS % bits == 0:
        return _unpack_aligned(words, bits, n_codes)
    return _unpack_straddling(words, bits, n_codes)


def _unpack_aligned(words: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    # 2, 4 and 8 bits never straddle a word: shift each word once per code it holds.
    shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=words.device)
    codes = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(words.shape[0], -1)[:, :n_codes].to(torch.uint8)


def _unpack_straddling(words: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    # A code may span two words, but the layout repeats every lcm(bits, 32) bits (3 words hold 32
    # 3-bit codes): read each code's word and the next within one period as a 64-bit value.
    rows, n_words = words.shape
    period_bits = math.lcm(bits, WORD_BITS)
    period_words, period_codes = period_bits // WORD_BITS, period_bits // bits
    n_periods = -(-n_words // period_words)
    unsigned = torch.nn.functional.pad(words.to(torch.int64) & 0xFFFFFFFF, (0, n_periods * period_words - n_words))
    periods = torch.nn.functional.pad(unsigned.view(rows, n_periods, period_words), (0, 1))
    offsets = torch.arange(period_codes, dtype=torch.int64, device=words.device) * bits
    index = offsets // WORD_BITS
    pair = periods[..., index] | (periods[..., index + 1] << WORD_BITS)
    codes = (pair >> (offsets % WORD_BITS)) & (2**bits - 1)
    return codes.reshape(rows, -1)[:, :n_codes].to(torch.uint8)


def _powers_of_two(n: int, device: torch.device) -> torch.Tensor:
    return torch.bitwise_left_shift(torch.ones(n, dtype=torch.int64, device=device), torch.arange(n, device=device))

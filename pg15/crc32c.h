/* CRC-32C (Castagnoli), as PostgreSQL's pg_comp_crc32c (src/port/pg_crc32c_sb8.c and
 * pg_crc32c_sse42.c): a slicing-by-8 table, or the SSE 4.2 instruction where the CPU has it.
 * Shared by the C extensions that check CRC-32Cs (pg15/_walscan.c: WAL records;
 * pageserver/redo/_redo.c: layer file blocks); each calls crc_select() once at import. */
#ifndef NEON_CRC32C_H
#define NEON_CRC32C_H

#include <stdint.h>
#include <string.h>

static uint32_t crc_table[8][256];

/* Four bytes as a little-endian value, whatever the machine's order (the table's order). */
static inline uint32_t
crc_load32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static void
crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

static uint32_t
crc_update_sw(uint32_t crc, const uint8_t *p, size_t n)
{
    while (n >= 8) {
        uint32_t lo = crc_load32(p) ^ crc;
        uint32_t hi = crc_load32(p + 4);
        crc = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^
              crc_table[5][(lo >> 16) & 0xFF] ^ crc_table[4][lo >> 24] ^
              crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
              crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2"))) static uint32_t
crc_update_hw(uint32_t crc, const uint8_t *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#define HAVE_HW_CRC 1
#endif

/* The running CRC (no initial or final inversion: callers add them). */
static uint32_t (*crc_update)(uint32_t, const uint8_t *, size_t) = crc_update_sw;

/* The table filled and the fastest implementation this CPU runs chosen. */
static void
crc_select(void)
{
    crc_init();
#ifdef HAVE_HW_CRC
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2"))
        crc_update = crc_update_hw;
#endif
}

/* CRC-32C of a buffer, as the crc32c package computes it (LayerFile's block checks). */
static inline uint32_t
crc32c_of(const uint8_t *p, size_t n)
{
    return crc_update(0xFFFFFFFFu, p, n) ^ 0xFFFFFFFFu;
}

#endif /* NEON_CRC32C_H */

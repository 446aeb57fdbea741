/*
 * A mutator that knows where WebSocket frame lengths sit. libFuzzer's own mutations rarely
 * put an edge value into a 64-bit length field: the field is 8 bytes, somewhere in a DATA
 * chunk, and one of hundreds of inputs. Length arithmetic is where frame parsers break
 * (wraps, the 16/64-bit boundaries, the size limit), so a quarter of the mutations here set
 * one length to such a value; the rest are libFuzzer's.
 *
 * Bytes that look like a client frame's second byte (MASK set) are taken as lengths: 126
 * and 127 are followed by a 16- or 64-bit length. Any byte can look like one, and that is
 * fine: the mutation is only a bias, never a filter.
 */
#include <stddef.h>
#include <stdint.h>

size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);

static uint64_t next(uint64_t *state) {
	// xorshift64*: libFuzzer gives a seed per call; a few numbers from it are enough
	*state ^= *state >> 12;
	*state ^= *state << 25;
	*state ^= *state >> 27;
	return *state * 0x2545F4914F6CDD1DULL;
}

static uint64_t edge64(uint64_t *rng) {
	static const uint64_t values[] = {
		0, 1, 125, 126, 127, 0xFFFF, 0x10000, 1023, 1024, 1025, 2048, 3072, 4095, 4096, 4097,
		0x7FFFFFFFFFFFFFFFULL, 0x8000000000000000ULL, 0xFFFFFFFFULL, 0x100000000ULL,
	};
	uint64_t r = next(rng);
	// just below 2^64: what a sum with another length wraps around to
	if (r % 3 == 0) return (uint64_t) 0 - 1 - (next(rng) % 16);
	return values[r % (sizeof(values) / sizeof(values[0]))];
}

static void put_be(uint8_t *p, uint64_t v, int n) {
	int i;
	for (i = n - 1; i >= 0; i--) {
		p[i] = (uint8_t) v;
		v >>= 8;
	}
}

size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed) {
	uint64_t rng = ((uint64_t) seed << 32) | (seed ^ 0x9E3779B9u) | 1;
	if (size >= 2 && next(&rng) % 4 == 0) {
		// an extended length (126: 16 bits follow, 127: 64 bits) when there is one, picked
		// uniformly; else a 7-bit one
		size_t ext[64], n_ext = 0, plain[64], n_plain = 0, i;
		for (i = 0; i + 2 < size; i++) {
			if (!(data[i] & 0x80)) continue;
			uint8_t len7 = data[i] & 0x7F;
			if ((len7 == 127 && i + 8 < size) || len7 == 126) {
				if (n_ext < 64) ext[n_ext++] = i;
			}
			else if (len7 < 126 && n_plain < 64) plain[n_plain++] = i;
		}
		if (n_ext && next(&rng) % 4 != 0) {
			i = ext[next(&rng) % n_ext];
			if ((data[i] & 0x7F) == 127) put_be(data + i + 1, edge64(&rng), 8);
			else put_be(data + i + 1, edge64(&rng) & 0xFFFF, 2);
			return size;
		}
		if (n_plain) {
			static const uint8_t small[] = { 0, 1, 2, 125, 126, 127 };
			data[plain[next(&rng) % n_plain]] = 0x80 | small[next(&rng) % sizeof(small)];
			return size;
		}
	}
	return LLVMFuzzerMutate(data, size, max_size);
}

/**
 * Table-driven CRC-32 for any reflected polynomial: IEEE (zip, PNG) and Castagnoli (CRC-32C,
 * TensorBoard's record framing).
 */
function makeTable(poly: number): Uint32Array {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (poly ^ (c >>> 1)) >>> 0 : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
}

const IEEE = makeTable(0xedb88320);
const CASTAGNOLI = makeTable(0x82f63b78);

function crc(table: Uint32Array, data: Uint8Array, seed: number): number {
  let c = ~seed >>> 0;
  for (let i = 0; i < data.length; i++) c = table[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

/** CRC-32 (IEEE 802.3); `seed` continues a previous value over more data. */
export function crc32(data: Uint8Array, seed = 0): number {
  return crc(IEEE, data, seed);
}

/** CRC-32C (Castagnoli). */
export function crc32c(data: Uint8Array, seed = 0): number {
  return crc(CASTAGNOLI, data, seed);
}

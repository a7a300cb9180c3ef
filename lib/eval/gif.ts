/**
 * A minimal animated GIF89a encoder: RGB frames quantised to a fixed 6×7×6 colour cube (252
 * colours), LZW-compressed, looping forever.
 */

const LEVELS = [6, 7, 6] as const;

/** The fixed palette (256 entries, the last 4 unused black). */
export function gifPalette(): Uint8Array {
  const pal = new Uint8Array(256 * 3);
  let i = 0;
  for (let r = 0; r < LEVELS[0]; r++)
    for (let g = 0; g < LEVELS[1]; g++)
      for (let b = 0; b < LEVELS[2]; b++, i++) {
        pal[i * 3] = Math.round((r * 255) / (LEVELS[0] - 1));
        pal[i * 3 + 1] = Math.round((g * 255) / (LEVELS[1] - 1));
        pal[i * 3 + 2] = Math.round((b * 255) / (LEVELS[2] - 1));
      }
  return pal;
}

/** Palette index of an RGB colour in [0,255]. */
export function gifIndex(r: number, g: number, b: number): number {
  const q = (v: number, n: number) => Math.min(n - 1, Math.max(0, Math.round((v / 255) * (n - 1))));
  return (q(r, LEVELS[0]) * LEVELS[1] + q(g, LEVELS[1])) * LEVELS[2] + q(b, LEVELS[2]);
}

/** GIF LZW of palette indices with minimum code size 8, as data sub-blocks. */
export function lzwEncode(indices: Uint8Array, minCodeSize = 8): Uint8Array {
  const clear = 1 << minCodeSize;
  const eoi = clear + 1;
  const bytes: number[] = [];
  let acc = 0;
  let nbits = 0;
  let codeSize = minCodeSize + 1;
  const emit = (code: number) => {
    acc |= code << nbits;
    nbits += codeSize;
    while (nbits >= 8) {
      bytes.push(acc & 0xff);
      acc >>>= 8;
      nbits -= 8;
    }
  };
  let table = new Map<number, number>();
  let next = eoi + 1;
  emit(clear);
  if (indices.length > 0) {
    let prefix = indices[0];
    for (let i = 1; i < indices.length; i++) {
      const k = indices[i];
      const key = (prefix << 8) | k;
      const found = table.get(key);
      if (found !== undefined) {
        prefix = found;
        continue;
      }
      emit(prefix);
      if (next === 4096) {
        emit(clear);
        table = new Map();
        next = eoi + 1;
        codeSize = minCodeSize + 1;
      } else {
        if (next >= 1 << codeSize) codeSize++;
        table.set(key, next++);
      }
      prefix = k;
    }
    emit(prefix);
  }
  emit(eoi);
  if (nbits > 0) bytes.push(acc & 0xff);
  // sub-blocks of at most 255 bytes, then the terminator
  const out: number[] = [];
  for (let i = 0; i < bytes.length; i += 255) {
    const n = Math.min(255, bytes.length - i);
    out.push(n, ...bytes.slice(i, i + n));
  }
  out.push(0);
  return Uint8Array.from(out);
}

/** Frames: HWC uint8 RGB images of the same size; delay in hundredths of a second. */
export function encodeGif(frames: Uint8Array[], height: number, width: number, delayCs = 25): Buffer {
  const parts: Buffer[] = [];
  const header = Buffer.alloc(13);
  header.write('GIF89a', 0, 'ascii');
  header.writeUInt16LE(width, 6);
  header.writeUInt16LE(height, 8);
  header[10] = 0xf7; // global colour table, 8 bits of colour resolution, 256 entries
  parts.push(header, Buffer.from(gifPalette()));
  // NETSCAPE2.0: loop forever
  parts.push(Buffer.from([0x21, 0xff, 0x0b, ...Buffer.from('NETSCAPE2.0', 'ascii'), 0x03, 0x01, 0x00, 0x00, 0x00]));
  for (const f of frames) {
    if (f.length !== height * width * 3) throw new Error(`encodeGif: a frame has ${f.length} values for ${height}×${width}×3`);
    const gce = Buffer.from([0x21, 0xf9, 0x04, 0x00, delayCs & 0xff, delayCs >> 8, 0x00, 0x00]);
    const desc = Buffer.alloc(10);
    desc[0] = 0x2c;
    desc.writeUInt16LE(width, 5);
    desc.writeUInt16LE(height, 7);
    const idx = new Uint8Array(height * width);
    for (let p = 0; p < idx.length; p++) idx[p] = gifIndex(f[p * 3], f[p * 3 + 1], f[p * 3 + 2]);
    parts.push(gce, desc, Buffer.from([8]), Buffer.from(lzwEncode(idx)));
  }
  parts.push(Buffer.from([0x3b]));
  return Buffer.concat(parts);
}

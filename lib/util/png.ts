/** A minimal PNG encoder (8-bit grey, RGB or RGBA, no filtering beyond 'none') over node:zlib. */
import { deflateSync } from 'node:zlib';
import { crc32 } from './crc32';

const SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
const COLOR_TYPE: Record<number, number> = { 1: 0, 3: 2, 4: 6 };

function chunk(type: string, data: Buffer): Buffer {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, 'ascii');
  data.copy(out, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
  return out;
}

/** Encodes an HWC uint8 image with 1 (grey), 3 (RGB) or 4 (RGBA) channels. */
export function encodePng(data: Uint8Array, height: number, width: number, channels: number): Buffer {
  const colorType = COLOR_TYPE[channels];
  if (colorType === undefined) throw new Error(`encodePng: ${channels} channels (expected 1, 3 or 4)`);
  if (data.length !== height * width * channels) {
    throw new Error(`encodePng: ${data.length} values for a ${height}×${width}×${channels} image`);
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = colorType;
  const stride = width * channels;
  const raw = Buffer.alloc(height * (stride + 1));
  for (let y = 0; y < height; y++) {
    raw[y * (stride + 1)] = 0; // filter: none
    raw.set(data.subarray(y * stride, (y + 1) * stride), y * (stride + 1) + 1);
  }
  return Buffer.concat([SIGNATURE, chunk('IHDR', ihdr), chunk('IDAT', deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}

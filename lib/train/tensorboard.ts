/**
 * Writes TensorBoard event files (scalars and PNG images) with no TensorFlow: the TFRecord
 * framing (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload) around
 * hand-encoded `Event` protocol buffers.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { crc32c } from '../util/crc32';
import { encodePng } from '../util/png';

function maskedCrc(data: Uint8Array): number {
  const c = crc32c(data);
  return (((c >>> 15) | (c << 17)) + 0xa282ead8) >>> 0;
}

/** Protocol-buffer field writers (only what Event/Summary need). */
class ProtoWriter {
  private parts: Buffer[] = [];

  private varint(v: number | bigint): void {
    let x = BigInt(v);
    if (x < 0n) x += 1n << 64n;
    const bytes: number[] = [];
    do {
      let b = Number(x & 0x7fn);
      x >>= 7n;
      if (x !== 0n) b |= 0x80;
      bytes.push(b);
    } while (x !== 0n);
    this.parts.push(Buffer.from(bytes));
  }

  private tag(field: number, wire: number): void {
    this.varint((field << 3) | wire);
  }

  double(field: number, v: number): this {
    this.tag(field, 1);
    const b = Buffer.alloc(8);
    b.writeDoubleLE(v);
    this.parts.push(b);
    return this;
  }

  float(field: number, v: number): this {
    this.tag(field, 5);
    const b = Buffer.alloc(4);
    b.writeFloatLE(v);
    this.parts.push(b);
    return this;
  }

  int(field: number, v: number): this {
    this.tag(field, 0);
    this.varint(v);
    return this;
  }

  bytes(field: number, v: Uint8Array | string): this {
    const b = typeof v === 'string' ? Buffer.from(v, 'utf8') : Buffer.from(v);
    this.tag(field, 2);
    this.varint(b.length);
    this.parts.push(b);
    return this;
  }

  finish(): Buffer {
    return Buffer.concat(this.parts);
  }
}

/** One summary value: a scalar or an encoded image. */
type SummaryValue = { tag: string; scalar: number } | { tag: string; png: Buffer; height: number; width: number; channels: number };

function eventBytes(step: number, wallTime: number, values?: SummaryValue[], fileVersion?: string): Buffer {
  const ev = new ProtoWriter().double(1, wallTime).int(2, step);
  if (fileVersion) ev.bytes(3, fileVersion);
  if (values) {
    const summary = new ProtoWriter();
    for (const v of values) {
      const value = new ProtoWriter().bytes(1, v.tag);
      if ('scalar' in v) value.float(2, v.scalar);
      else {
        const image = new ProtoWriter().int(1, v.height).int(2, v.width).int(3, v.channels).bytes(4, v.png).finish();
        value.bytes(4, image);
      }
      summary.bytes(1, value.finish());
    }
    ev.bytes(5, summary.finish());
  }
  return ev.finish();
}

export function tfRecord(payload: Buffer): Buffer {
  const header = Buffer.alloc(12);
  header.writeBigUInt64LE(BigInt(payload.length), 0);
  header.writeUInt32LE(maskedCrc(header.subarray(0, 8)), 8);
  const footer = Buffer.alloc(4);
  footer.writeUInt32LE(maskedCrc(payload), 0);
  return Buffer.concat([header, payload, footer]);
}

/** Reads back the records of an event file, checking both CRCs (for tests and tools). */
export function readTfRecords(buf: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  while (at < buf.length) {
    if (at + 12 > buf.length) throw new Error(`truncated record header at byte ${at}`);
    const len = Number(buf.readBigUInt64LE(at));
    if (buf.readUInt32LE(at + 8) !== maskedCrc(buf.subarray(at, at + 8))) throw new Error(`bad length CRC at byte ${at}`);
    const payload = buf.subarray(at + 12, at + 12 + len);
    if (payload.length !== len || at + 16 + len > buf.length) throw new Error(`truncated record at byte ${at}`);
    if (buf.readUInt32LE(at + 12 + len) !== maskedCrc(payload)) throw new Error(`bad payload CRC at byte ${at}`);
    out.push(Buffer.from(payload));
    at += 16 + len;
  }
  return out;
}

export class TensorBoardWriter {
  readonly file: string;
  private fd: number;

  constructor(dir: string) {
    fs.mkdirSync(dir, { recursive: true });
    const stamp = Math.floor(Date.now() / 1000);
    this.file = path.join(dir, `events.out.tfevents.${stamp}.${os.hostname()}.${process.pid}`);
    this.fd = fs.openSync(this.file, 'a');
    this.write(eventBytes(0, Date.now() / 1000, undefined, 'brain.Event:2'));
  }

  private write(event: Buffer): void {
    fs.writeSync(this.fd, tfRecord(event));
  }

  scalars(step: number, values: Record<string, number>): void {
    const list: SummaryValue[] = Object.entries(values)
      .filter(([, v]) => Number.isFinite(v))
      .map(([tag, scalar]) => ({ tag, scalar }));
    if (list.length) this.write(eventBytes(step, Date.now() / 1000, list));
  }

  /** An HWC uint8 image (1, 3 or 4 channels). */
  image(step: number, tag: string, data: Uint8Array, height: number, width: number, channels: number): void {
    const png = encodePng(data, height, width, channels);
    this.write(eventBytes(step, Date.now() / 1000, [{ tag, png, height, width, channels }]));
  }

  flush(): void {
    fs.fsyncSync(this.fd);
  }

  close(): void {
    if (this.fd >= 0) {
      fs.closeSync(this.fd);
      this.fd = -1;
    }
  }
}

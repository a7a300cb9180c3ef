/**
 * The plain TypeScript side of precision 'bf16' (native/bf16.h, native/nhwc.h): the rounding of
 * an fp32 operand to bfloat16, bit for bit as the addon (and the AVX512_BF16 conversions) do it,
 * and which products of a convolution run in bf16. A bf16 convolution equals the fp32 one of its
 * rounded operands up to the order of the fp32 sums (each product of two bf16 is exact in fp32),
 * which is how the tests check the addon against tfjs.
 */
import { winogradTakes } from './winograd';

/**
 * x rounded to the nearest bfloat16 (ties to even), as a float32: zeros and denormals become a
 * zero of the same sign (the instructions flush them), NaN stays a (quiet) NaN, overflow is ±Inf.
 */
export function roundToBf16(x: Float32Array): Float32Array {
  const out = new Float32Array(x.length);
  const src = new Uint32Array(x.buffer, x.byteOffset, x.length);
  const dst = new Uint32Array(out.buffer);
  for (let i = 0; i < x.length; i++) {
    const u = src[i];
    let h: number;
    if ((u & 0x7f800000) === 0) h = (u >>> 16) & 0x8000;
    else if ((u & 0x7fffffff) > 0x7f800000) h = (u >>> 16) | 0x40;
    else h = (u + 0x7fff + ((u >>> 16) & 1)) >>> 16; // < 2^32 for every non-NaN u
    dst[i] = (h << 16) >>> 0;
  }
  return out;
}

/** The products of a convolution that precision 'bf16' computes in bf16 (the rest stay fp32). */
export interface Bf16Coverage {
  /** y = conv(x, w): with at least 16 output channels (a narrower one stays fp32), unless Winograd takes it */
  forward: boolean;
  /** dx: at stride 1 (itself a forward convolution, with cin outputs) with at least 16 input channels, unless Winograd takes it */
  inputGrad: boolean;
  /** dw, unless Winograd takes the forward pass; db is a plain sum of dy·act', in fp32 */
  filterGrad: boolean;
}

/**
 * winogradWidth: the addon's vector width when its Winograd convolutions are on (lib/ops/winograd.ts;
 * they run in fp32 in either precision, being faster than bf16's direct sums), else null.
 */
export function bf16Coverage(cin: number, cout: number, kernel: number, stride: number, pad: number, winogradWidth: number | null): Bf16Coverage {
  const winograd = (i: number, o: number, s: number) => winogradWidth !== null && winogradTakes(i, o, kernel, s, winogradWidth);
  return {
    forward: cout >= 16 && !winograd(cin, cout, stride),
    inputGrad: stride === 1 && pad <= kernel - 1 && cin >= 16 && !winograd(cout, cin, 1),
    filterGrad: !winograd(cin, cout, stride),
  };
}

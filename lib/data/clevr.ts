/**
 * The original's CLEVR preprocessing: a 192×192 crop (rows 29:221, columns 64:256 of the
 * 240×320 frames) resized to 96×96 ('clevr-small') or 128×128 ('clevr-large') with Pillow's
 * bicubic filter. Masks for ARI keep the 192×192 crop and are not resized.
 */
import { ImageU8, resizeBicubicU8 } from './resize';

export type PreprocessStyle = '' | 'clevr-small' | 'clevr-large';

export const PREPROCESS_STYLES: readonly PreprocessStyle[] = ['', 'clevr-small', 'clevr-large'];

export const CLEVR_CROP = { top: 29, left: 64, size: 192 } as const;

export function clevrOutputSize(style: PreprocessStyle): number | undefined {
  return style === 'clevr-small' ? 96 : style === 'clevr-large' ? 128 : undefined;
}

/** Crops one plane-interleaved HWC uint8 image (or mask with C = 1). */
export function cropHWC(
  data: Uint8Array,
  height: number,
  width: number,
  channels: number,
  top: number,
  left: number,
  cropHeight: number,
  cropWidth: number,
): Uint8Array {
  if (top < 0 || left < 0 || top + cropHeight > height || left + cropWidth > width) {
    throw new Error(
      `crop rows ${top}:${top + cropHeight}, columns ${left}:${left + cropWidth} does not fit a ${height}×${width} image`,
    );
  }
  const out = new Uint8Array(cropHeight * cropWidth * channels);
  const rowLen = cropWidth * channels;
  for (let y = 0; y < cropHeight; y++) {
    const src = ((top + y) * width + left) * channels;
    out.set(data.subarray(src, src + rowLen), y * rowLen);
  }
  return out;
}

/** Applies a preprocessing style to one HWC uint8 image. */
export function preprocessImage(img: ImageU8, style: PreprocessStyle): ImageU8 {
  const size = clevrOutputSize(style);
  if (size === undefined) return img;
  const { top, left, size: crop } = CLEVR_CROP;
  const cropped = cropHWC(img.data, img.height, img.width, img.channels, top, left, crop, crop);
  return resizeBicubicU8({ data: cropped, height: crop, width: crop, channels: img.channels }, size, size);
}

/**
 * Tensors (the tf.Variables a DeviceParams group keeps) whose current values may live on a GPU
 * device only: an optimizer there updated them, and their host copies are brought up to date only
 * when something on the host reads them. The ops' readers of host data (f32, contentTag) call
 * hostCurrent first, so a stale host copy is never read or uploaded.
 */
const refreshers = new WeakMap<object, () => void>();

/** While `refresh` is set, the host copy of `t` is stale and `refresh()` makes it current; null: it is current. */
export function setHostRefresh(t: object, refresh: (() => void) | null): void {
  if (refresh) refreshers.set(t, refresh);
  else refreshers.delete(t);
}

/** `t`, with its host copy made current first when a device holds newer values. */
export function hostCurrent<T extends object>(t: T): T {
  refreshers.get(t)?.();
  return t;
}

/** Command-line argument parsers shared by the emorl-* commands. */
import { InvalidArgumentError } from 'commander';

/** A commander parser for an integer option of at least `min`, naming the option in its error. */
export function integerOption(name: string, min: number): (value: string) => number {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isSafeInteger(n) || n < min) throw new InvalidArgumentError(`${name} must be an integer >= ${min}`);
    return n;
  };
}

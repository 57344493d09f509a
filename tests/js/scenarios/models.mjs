// models.list and models.retrieve of `input.id`, and of `input.missing` (which must fail).
export default async ({ client, input, attempt }) => {
  const sdk = client();
  const listed = [];
  for await (const model of sdk.models.list()) listed.push(model);
  return {
    listed,
    retrieved: await sdk.models.retrieve(input.id),
    missing: await attempt(() => sdk.models.retrieve(input.missing)),
  };
};

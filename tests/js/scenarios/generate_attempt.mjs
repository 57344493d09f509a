// images.generate with `input` as the request, caught: {ok, value} or {ok: false, error}.
export default async ({ client, input, attempt }) => attempt(() => client().images.generate(input));

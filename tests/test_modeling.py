import logging

import pytest
import torch

from modeling_clara import ClaraForRAG, compressed_text, cosine_scores, differentiable_topk
from testing_utils import DOCUMENTS, build_base, randomize_adapters

QUESTIONS = ["Where is the Eiffel Tower?", "Who won two Nobel prizes?"]


# ---------------------------------------------------------------- memory-token layout


def test_memory_tokens_are_added_contiguously_after_the_base_vocabulary(clara, tokenizer):
    config, new_tokenizer = clara.config, clara.processor.tokenizer
    assert config.num_memory_tokens == 4
    expected = [f"<MEM{i}>" for i in range(4)] + ["<ENC>", "<SEP>"]
    ids = new_tokenizer.convert_tokens_to_ids(expected)
    assert ids == [*config.memory_token_ids, config.encoder_token_id, config.separator_token_id]
    assert ids == list(range(len(tokenizer), len(tokenizer) + 6))
    assert clara.first_new_token_id == len(tokenizer)
    assert clara.added_token_embeddings.weight.shape == (6, clara.config.text_config.hidden_size)
    # The caller's tokenizer is left alone; the base embedding matrix keeps its size.
    assert "<ENC>" not in tokenizer.get_vocab()
    assert clara.language_model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert new_tokenizer.padding_side == "left"


def test_from_base_model_loads_a_local_path(tokenizer, tmp_path):
    build_base("llama", len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = ClaraForRAG.from_base_model(str(tmp_path), doc_max_length=32, compression_rate=8)
    assert model.config.num_memory_tokens == 4
    assert model.compress_documents(DOCUMENTS[:1]).shape == (1, 4, 32)


def test_from_base_model_rejects_a_clara_tokenizer_and_unknown_options(clara, tokenizer):
    with pytest.raises(ValueError, match="already has CLaRa tokens"):
        ClaraForRAG.from_base_model(build_base("llama", len(tokenizer)), clara.processor.tokenizer, doc_max_length=16, compression_rate=4)
    with pytest.raises(TypeError, match="compresion_rate"):
        ClaraForRAG.from_base_model(build_base("llama", len(tokenizer)), tokenizer, compresion_rate=4)


def test_new_tokens_inside_a_padded_vocabulary_are_never_generated(tokenizer, monkeypatch):
    base = build_base("mistral", len(tokenizer) + 16)  # LM head rows beyond the tokenizer, as in padded vocabularies
    model = ClaraForRAG.from_base_model(base, tokenizer, doc_max_length=16, compression_rate=4)
    new_ids = [*model.config.memory_token_ids, model.config.encoder_token_id, model.config.separator_token_id]
    assert model.generation_config.suppress_tokens == new_ids
    prompt_ids = model.processor.tokenize_for_generation(QUESTIONS[:1], documents=[DOCUMENTS[:1]])["input_ids"]
    with torch.no_grad():
        # Point the new tokens' LM-head rows at the prompt's last state: they become the likeliest next tokens.
        last_state = model.language_model.get_decoder()(prompt_ids).last_hidden_state[0, -1]
        model.language_model.get_output_embeddings().weight[new_ids] = 100 * last_state / last_state.norm()
    generated = []
    generate = model.language_model.generate
    monkeypatch.setattr(model.language_model, "generate", lambda **kwargs: generated.append(generate(**kwargs)) or generated[-1])
    model.generate_from_text(QUESTIONS[:1], [DOCUMENTS[:1]], max_new_tokens=4)
    assert generated[0].numel() > 0
    assert not torch.isin(generated[0], torch.tensor(new_ids)).any()
    model.generation_config.suppress_tokens = None  # without the suppression they would be generated
    model.generate_from_text(QUESTIONS[:1], [DOCUMENTS[:1]], max_new_tokens=4)
    assert generated[1][0, 0] in new_ids


def test_compression_input_is_enc_document_memory_left_padded(clara):
    short, long = "Paris", "The Eiffel Tower is in Paris"
    batch = clara.processor.tokenize_for_compression([short, long])
    config = clara.config
    short_ids = clara.processor.tokenizer(short, add_special_tokens=False)["input_ids"]
    long_ids = clara.processor.tokenizer(long, add_special_tokens=False)["input_ids"]
    expected_long = [config.encoder_token_id, *long_ids, *config.memory_token_ids]
    expected_short = [config.encoder_token_id, *short_ids, *config.memory_token_ids]
    padding = len(expected_long) - len(expected_short)
    assert batch["input_ids"][1].tolist() == expected_long
    assert batch["input_ids"][0, padding:].tolist() == expected_short
    assert batch["input_ids"][0, :padding].tolist() == [clara.processor.tokenizer.pad_token_id] * padding
    assert batch["attention_mask"][0].tolist() == [0] * padding + [1] * len(expected_short)
    assert batch["attention_mask"][1].sum() == len(expected_long)


def test_long_documents_are_truncated_and_counted(clara, caplog):
    long_document = " ".join(["tower"] * 100)
    with caplog.at_level(logging.WARNING):
        batch = clara.processor.tokenize_for_compression([long_document, "Paris"])
    assert batch["attention_mask"][0].sum() == 1 + clara.config.doc_max_length + clara.config.num_memory_tokens
    assert "1 of 2 documents were longer than doc_max_length=16" in caplog.text


def test_compressed_text_is_the_text_the_compressor_reads(clara):
    tokenizer, length = clara.processor.tokenizer, clara.config.doc_max_length
    passage = "Zorland is a country. Its capital is Quvi. Its flag is blue, and its river is the long Ebrin."
    assert len(tokenizer(passage, add_special_tokens=False)["input_ids"]) > length
    cut = compressed_text(passage, tokenizer, length)
    assert passage.startswith(cut) and len(cut) < len(passage)
    whole_input, cut_input = (clara.processor.tokenize_for_compression([text]) for text in (passage, cut))
    assert torch.equal(whole_input["input_ids"], cut_input["input_ids"])
    assert compressed_text(passage, tokenizer, 1000) == passage
    # Characters that take several byte-level tokens: the cut keeps whole characters and never exceeds the length.
    spelled = "Kushiro 雄別鉄道 and 🇱🇾 Libya"
    for tokens in range(1, len(tokenizer(spelled, add_special_tokens=False)["input_ids"]) + 1):
        cut = compressed_text(spelled, tokenizer, tokens)
        assert spelled.startswith(cut) and len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= tokens


# ---------------------------------------------------------------- compression


def test_compress_documents_shape_matches_a_reference_forward(clara):
    memories = clara.compress_documents(DOCUMENTS)
    config = clara.config
    assert memories.shape == (len(DOCUMENTS), config.num_memory_tokens, config.text_config.hidden_size)
    assert not memories.requires_grad
    # Reference: the full causal LM on one unpadded sequence, compressor active, last layer at the memory positions.
    for i, document in enumerate(DOCUMENTS):
        batch = clara.processor.tokenize_for_compression([document])
        with torch.no_grad(), clara.adapter("compressor"):
            outputs = clara.language_model(
                inputs_embeds=clara.embed_tokens(batch["input_ids"]), output_hidden_states=True
            )
        torch.testing.assert_close(memories[i], outputs.hidden_states[-1][0, -config.num_memory_tokens :])


def test_compression_never_runs_the_lm_head(clara):
    calls = []
    hook = clara.language_model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    clara.compress_documents(DOCUMENTS)
    clara.encode_queries(QUESTIONS)
    assert calls == []
    clara.answer(QUESTIONS[:1], [DOCUMENTS], max_new_tokens=1)
    assert calls  # the hook itself works
    hook.remove()


def test_compression_is_batch_invariant(clara):
    documents = ["Paris", "Marie Curie won", *DOCUMENTS]  # lengths from 2 to 16 tokens: padding differs by batch
    lengths = clara.processor.tokenize_for_compression(documents)["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 2
    together = clara.compress_documents(documents, batch_size=len(documents))
    alone = torch.cat([clara.compress_documents([document]) for document in documents])
    reordered = clara.compress_documents(documents[::-1], batch_size=4).flip(0)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together, reordered, atol=1e-5, rtol=1e-5)


def test_compressor_and_query_reasoner_are_different_adapters(clara):
    as_document = clara.compress_documents(QUESTIONS)
    as_query = clara.encode_queries(QUESTIONS)
    assert as_query.shape == as_document.shape
    assert not torch.allclose(as_query, as_document)


@pytest.mark.parametrize("texts", [[], [""], ["Paris", "   "], "a single string", [None]])
def test_bad_document_lists_raise(clara, texts):
    with pytest.raises(ValueError):
        clara.compress_documents(texts)
    with pytest.raises(ValueError):
        clara.encode_queries(texts)


def test_compression_follows_the_model_dtype(llama_clara):
    model = llama_clara.to(torch.bfloat16)
    memories = model.compress_documents(DOCUMENTS[:2])
    assert memories.dtype == torch.bfloat16
    scores, _ = model.retrieve(QUESTIONS, memories, k=1)
    assert scores.dtype == torch.float32
    assert len(model.answer(QUESTIONS[:1], [DOCUMENTS[:2]], max_new_tokens=2)) == 1


# ---------------------------------------------------------------- retrieval


def _brute_force_cosine(query: torch.Tensor, document: torch.Tensor) -> float:
    q, d = query.flatten().double(), document.flatten().double()
    return float(q @ d / (q.norm() * d.norm()))


def test_retrieve_over_a_shared_corpus_matches_brute_force(clara):
    corpus = clara.compress_documents(DOCUMENTS)
    queries = clara.encode_queries(QUESTIONS)
    scores, indices = clara.retrieve(QUESTIONS, corpus, k=3)
    for q in range(len(QUESTIONS)):
        expected = sorted(
            ((_brute_force_cosine(queries[q], corpus[n]), n) for n in range(len(DOCUMENTS))), reverse=True
        )[:3]
        assert indices[q].tolist() == [n for _, n in expected]
        torch.testing.assert_close(scores[q], torch.tensor([s for s, _ in expected], dtype=torch.float32))


def test_retrieve_over_per_question_candidates_matches_brute_force(clara):
    corpus = clara.compress_documents(DOCUMENTS)
    candidates = torch.stack([corpus[[0, 1, 2]], corpus[[3, 2, 1]]])  # [Q=2, N=3, n_mem, hidden]
    queries = clara.encode_queries(QUESTIONS)
    scores, indices = clara.retrieve(QUESTIONS, candidates, k=2)
    for q in range(2):
        brute = torch.tensor([_brute_force_cosine(queries[q], candidates[q, n]) for n in range(3)])
        expected = brute.topk(2)
        assert indices[q].tolist() == expected.indices.tolist()
        torch.testing.assert_close(scores[q], expected.values.float())


def test_retrieve_bad_input_raises(clara):
    corpus = clara.compress_documents(DOCUMENTS[:2])
    for k in (3, 0, -1):
        with pytest.raises(ValueError, match=f"k={k} must be between 1"):
            clara.retrieve(QUESTIONS, corpus, k=k)
    with pytest.raises(ValueError, match="n_mem, hidden"):
        clara.retrieve(QUESTIONS, corpus[:, :2], k=1)
    with pytest.raises(ValueError, match="candidates for 3"):
        clara.retrieve(QUESTIONS, corpus.unsqueeze(0).expand(3, -1, -1, -1), k=1)
    with pytest.raises(ValueError, match="shape"):
        cosine_scores(corpus[0], corpus)


# ---------------------------------------------------------------- differentiable top-k


def _reference_topk(scores, k, temperature):
    """The reference loop: argmax over the not-yet-taken candidates, straight-through per-slot softmax."""
    logits = scores / temperature
    taken = torch.zeros_like(logits)
    slots = []
    for _ in range(k):
        masked = logits + torch.log(1 - taken + 1e-8)
        soft = torch.softmax(masked, dim=-1)
        hard = torch.nn.functional.one_hot(masked.argmax(-1), logits.shape[-1]).to(logits.dtype)
        slots.append(hard + soft - soft.detach())
        taken = taken + hard
    return torch.stack(slots, dim=1)


def test_differentiable_topk_forward_is_hard_topk_in_rank_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7], [0.5, 0.2, 0.8, 0.1]])
    weights, indices = differentiable_topk(scores, k=3, temperature=0.02)
    assert indices.tolist() == [[1, 3, 2], [2, 0, 1]]
    expected = torch.nn.functional.one_hot(indices, 4).float()
    torch.testing.assert_close(weights, expected)
    candidates = torch.randn(2, 4, 5)
    selected = torch.einsum("bkn,bnd->bkd", weights, candidates)
    torch.testing.assert_close(selected, candidates[torch.arange(2)[:, None], indices])


def test_differentiable_topk_gradients_match_the_reference():
    torch.manual_seed(0)
    raw = torch.randn(3, 6)
    candidates = torch.randn(3, 6, 4)
    target = torch.randn(3, 2, 4)
    gradients = []
    for implementation in (lambda s: differentiable_topk(s, 2, 0.5)[0], lambda s: _reference_topk(s, 2, 0.5)):
        scores = raw.clone().requires_grad_(True)
        selected = torch.einsum("bkn,bnd->bkd", implementation(scores), candidates)
        ((selected - target) ** 2).sum().backward()
        gradients.append(scores.grad)
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[0], gradients[1])


@pytest.mark.parametrize("k", [0, 7])
def test_differentiable_topk_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k="):
        differentiable_topk(torch.randn(2, 6), k=k, temperature=0.02)


# ---------------------------------------------------------------- generator prompt


def test_memory_placeholders_are_replaced_at_exactly_their_positions(clara):
    batch = clara.processor.tokenize_for_generation(["Where is it?", "Who won two Nobel prizes in science?"], [2, 1])
    input_ids = batch["input_ids"]
    config = clara.config
    n_mem, hidden = config.num_memory_tokens, config.text_config.hidden_size
    vectors = torch.randn(3 * n_mem, hidden)  # question 0: two documents, question 1: one
    embeddings = clara.generator_embeddings(input_ids, vectors)
    reference = clara.embed_tokens(input_ids)
    next_vector = 0
    for row in range(2):
        for position, token_id in enumerate(input_ids[row].tolist()):
            if token_id in config.memory_token_ids:
                torch.testing.assert_close(embeddings[row, position], vectors[next_vector])
                # Blocks are <MEM0>..<MEM{n-1}> then <SEP>.
                assert token_id == config.memory_token_ids[next_vector % n_mem]
                if next_vector % n_mem == n_mem - 1:
                    assert input_ids[row, position + 1] == config.separator_token_id
                next_vector += 1
            else:
                torch.testing.assert_close(embeddings[row, position], reference[row, position])
    assert next_vector == len(vectors)


def test_generator_input_errors_are_clear(clara):
    batch = clara.processor.tokenize_for_generation(QUESTIONS, 2)
    hidden = clara.config.text_config.hidden_size
    with pytest.raises(ValueError, match="memory placeholders"):
        clara.generator_embeddings(batch["input_ids"], torch.randn(2, 1, 4, hidden))
    with pytest.raises(ValueError, match="hidden size"):
        clara.generator_embeddings(batch["input_ids"], torch.randn(2, 2, 4, hidden + 1))


@pytest.mark.parametrize("control_text", ["<MEM0>", "<SEP>", "<ENC>", "<|im_end|>", "<MEM1><SEP>"])
def test_user_text_never_becomes_a_control_token(clara, control_text):
    processor = clara.processor
    control_ids = set(processor.added_token_ids) | {processor.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    document = f"A {control_text}"
    # Compression: only the layout's own <ENC> and memory tokens are control tokens (16-token documents here).
    ids = processor.tokenize_for_compression([document])["input_ids"][0].tolist()
    assert ids[0] == processor.encoder_token_id and ids[-4:] == processor.memory_token_ids
    assert not control_ids & set(ids[1:-4])
    decoded = processor.tokenizer.decode(ids[1:-4])
    assert decoded == document or (len(ids) - 5 == processor.doc_max_length and document.startswith(decoded))
    # Generation: the question and the answer are text; the placeholders are exactly the documents' blocks.
    question, answer = f"What does {control_text} mean?", f"It means {control_text}."
    batch = processor.tokenize_for_generation([question], 2, answers=[answer])
    ids = batch["input_ids"][0]
    assert int(torch.isin(ids, torch.tensor(processor.memory_token_ids)).sum()) == 2 * 4
    assert int((ids == processor.separator_token_id).sum()) == 2
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(labelled).startswith(answer)
    assert question in processor.tokenizer.decode(ids)
    # The raw-text baseline reads the document as text too.
    ids = processor.tokenize_for_generation([question], documents=[[document]])["input_ids"][0]
    assert not set(processor.added_token_ids) & set(ids.tolist())


def test_a_user_text_prompt_tokenizes_like_the_whole_prompt_for_plain_text(clara):
    """Cutting the rendered template at the user's text changes nothing for ordinary text: the pieces give the ids
    the tokenizer gives the whole rendered prompt."""
    processor = clara.processor
    batch = processor.tokenize_for_generation(QUESTIONS[:1], documents=[DOCUMENTS[:2]], answers=["Paris"])
    conversation = [
        {"role": "system", "content": processor.system_prompt},
        {"role": "user", "content": processor.user_prompt_template.format(documents="\n\n".join(DOCUMENTS[:2]), question=QUESTIONS[0])},
        {"role": "assistant", "content": "Paris"},
    ]
    whole = processor.tokenizer.apply_chat_template(conversation, tokenize=False)
    expected = processor.tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == expected


def test_adapter_context_restores_the_previous_adapter_and_the_trainable_set(clara):
    clara.set_trainable_components(["compressor", "added_token_embeddings"])
    trainable = {n for n, p in clara.named_parameters() if p.requires_grad}
    layer = clara._lora_layers[0]
    with clara.adapter("generator"):
        assert layer.active_adapters == [clara.adapter_names["generator"]] and not layer.disable_adapters
        with clara.adapter(None):
            assert layer.disable_adapters
            assert {n for n, p in clara.named_parameters() if p.requires_grad} == trainable
        assert layer.active_adapters == [clara.adapter_names["generator"]] and not layer.disable_adapters
    with pytest.raises(RuntimeError), clara.adapter("query_reasoner"):
        raise RuntimeError  # restored on errors too
    assert layer.active_adapters != [clara.adapter_names["query_reasoner"]]
    assert {n for n, p in clara.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(ValueError, match="Unknown adapter component"):
        with clara.adapter("decoder"):
            pass


def test_the_adapter_context_runs_what_peft_set_adapter_runs(clara):
    # adapter() writes peft's active-adapter state itself, without peft's walk over every adapter parameter.
    input_ids = clara.processor.tokenizer(DOCUMENTS[:2], return_tensors="pt", padding=True)["input_ids"]
    logits = {}
    for component in ["compressor", "query_reasoner", "generator", None]:
        with torch.no_grad(), clara.adapter(component):
            logits[component] = clara.language_model(input_ids).logits
        for layer in clara._lora_layers:
            layer.enable_adapters(component is not None)
            if component is not None:
                layer.set_adapter(clara.adapter_names[component])
        with torch.no_grad():
            assert torch.equal(logits[component], clara.language_model(input_ids).logits), component
    assert len({tuple(value.flatten()[:8].tolist()) for value in logits.values()}) == 4  # four different models


def test_labels_cover_exactly_the_answer(clara):
    batch = clara.processor.tokenize_for_generation(QUESTIONS, 1, answers=["Paris", "Marie Curie"])
    for row, answer in enumerate(["Paris", "Marie Curie"]):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert labelled.tolist() == batch["input_ids"][row, -len(labelled) :].tolist()
        assert clara.processor.tokenizer.decode(labelled).startswith(answer)
        assert labelled[-2:].tolist()[0] == clara.processor.tokenizer.eos_token_id  # <|im_end|> then "\n"


# ---------------------------------------------------------------- base model and answering


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_adapters_off_reproduces_the_base_model_exactly(kind, tokenizer):
    input_ids = tokenizer(["The Eiffel Tower is in Paris"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = build_base(kind, len(tokenizer))(input_ids).logits
    model = ClaraForRAG.from_base_model(build_base(kind, len(tokenizer)), tokenizer, doc_max_length=16, compression_rate=4)
    with torch.no_grad(), model.adapter(None):
        assert torch.equal(model.language_model(input_ids).logits, expected)
        assert torch.equal(model.language_model(inputs_embeds=model.embed_tokens(input_ids)).logits, expected)
    # Fresh LoRA adapters start as the identity (lora_B = 0).
    with torch.no_grad(), model.adapter("generator"):
        assert torch.equal(model.language_model(input_ids).logits, expected)


def test_answer_equals_the_pipeline_it_describes(clara):
    documents = [DOCUMENTS, DOCUMENTS[1:]]
    answers = clara.answer(QUESTIONS, documents, k=2, max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    selected = []
    for question, candidates in zip(QUESTIONS, documents):
        scores, indices = clara.retrieve([question], clara.compress_documents(candidates), k=2)
        selected.append(clara.compress_documents([candidates[i] for i in indices[0].tolist()]))
    assert clara.generate_from_compressed(QUESTIONS, selected, max_new_tokens=5) == answers


def test_answer_is_batch_invariant(clara):
    documents = [DOCUMENTS, DOCUMENTS[:2]]
    together = clara.answer(QUESTIONS, documents, max_new_tokens=6)
    alone = [clara.answer([q], [d], max_new_tokens=6)[0] for q, d in zip(QUESTIONS, documents)]
    assert together == alone


def test_default_k_is_capped_at_the_candidate_count(clara):
    assert clara.config.generation_top_k == 2
    assert len(clara.answer(QUESTIONS[:1], [DOCUMENTS[:1]], max_new_tokens=2)) == 1


def test_generation_parameters_come_from_the_generation_config(clara, monkeypatch):
    used = []
    generate = clara.language_model.generate

    def recording_generate(**kwargs):
        used.append(kwargs["generation_config"])
        return generate(**kwargs)

    monkeypatch.setattr(clara.language_model, "generate", recording_generate)
    clara.generation_config.max_new_tokens = 3
    clara.answer(QUESTIONS[:1], [DOCUMENTS], k=1)
    clara.answer(QUESTIONS[:1], [DOCUMENTS], k=1, max_new_tokens=5)
    assert [config.max_new_tokens for config in used] == [3, 5]
    assert all(config.do_sample is False for config in used)
    assert clara.generation_config.max_new_tokens == 3  # a call's override does not stick


def test_generate_from_text_uses_the_bare_base_model(clara):
    texts = clara.generate_from_text(QUESTIONS, [DOCUMENTS[:1], DOCUMENTS[1:3]], max_new_tokens=4)
    assert len(texts) == 2
    # The baseline must not depend on the adapters.
    for name, parameter in clara.named_parameters():
        if "lora_B" in name:
            parameter.data.mul_(5)
    assert clara.generate_from_text(QUESTIONS, [DOCUMENTS[:1], DOCUMENTS[1:3]], max_new_tokens=4) == texts


def _generator_logits(model, memories, bare_base=False):
    batch = model.processor.tokenize_for_generation(QUESTIONS, [len(m) for m in memories])
    inputs_embeds = model.generator_embeddings(batch["input_ids"], memories.flatten(0, 2))
    with torch.no_grad(), model.adapter(None) if bare_base else model._running("generator"):
        return model.language_model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"]).logits


def test_merged_generator_gives_the_adapters_logits_and_answers_and_leaves_the_rest_exact(clara):
    clara.to(torch.float64)  # float64: merged and unmerged sums round alike to far below the tolerance
    memories = clara.compress_documents(DOCUMENTS[:2])
    selected = torch.stack([memories, memories.flip(0)])
    unmerged_logits = _generator_logits(clara, selected)
    assert not torch.allclose(unmerged_logits, _generator_logits(clara, selected, bare_base=True))  # adapters matter
    unmerged_answers = clara.generate_from_compressed(QUESTIONS, selected, max_new_tokens=6)
    state = {name: tensor.clone() for name, tensor in clara.state_dict().items()}
    with torch.no_grad(), clara.adapter(None):
        base_logits = clara.language_model(torch.tensor([[5, 6, 7]])).logits

    clara.merge_adapter("generator")
    assert clara.merged_adapters == ("generator",)
    merged_weights = [layer.clara_merged_generator for layer in clara._lora_layers]
    merged_logits = _generator_logits(clara, selected)
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=0, atol=1e-10)
    assert clara.generate_from_compressed(QUESTIONS, selected, max_new_tokens=6) == unmerged_answers
    # Nothing changed since the merge, so no pass merged again.
    assert all(layer.clara_merged_generator is weight for layer, weight in zip(clara._lora_layers, merged_weights))
    # The merged weights are swapped in for generation only: every other path reads the untouched weights.
    assert torch.equal(clara.compress_documents(DOCUMENTS[:2]), memories)
    with torch.no_grad(), clara.adapter(None):
        assert torch.equal(clara.language_model(torch.tensor([[5, 6, 7]])).logits, base_logits)
    assert state.keys() == clara.state_dict().keys()  # the merged copies are never saved
    assert all(torch.equal(state[name], tensor) for name, tensor in clara.state_dict().items())

    clara.unmerge_adapter()
    assert clara.merged_adapters == ()
    assert not any(hasattr(layer, "clara_merged_generator") for layer in clara._lora_layers)
    assert torch.equal(_generator_logits(clara, selected), unmerged_logits)


def test_merged_generator_is_merged_again_after_the_adapter_or_the_dtype_changes(clara):
    memories = clara.compress_documents(DOCUMENTS[:2])[:, None]
    clara.merge_adapter("generator")
    before = clara.generate_from_compressed(QUESTIONS, memories, max_new_tokens=6)
    with torch.no_grad():
        for name, parameter in clara.named_parameters():
            if "lora_B.generator" in name:
                parameter.mul_(40)  # what an optimizer step does: an in-place change
    clara.to(torch.float64)
    memories = memories.double()
    merged = clara.generate_from_compressed(QUESTIONS, memories, max_new_tokens=6)
    merged_logits = _generator_logits(clara, memories)
    clara.unmerge_adapter("generator")
    assert merged == clara.generate_from_compressed(QUESTIONS, memories, max_new_tokens=6) != before
    torch.testing.assert_close(merged_logits, _generator_logits(clara, memories), rtol=0, atol=1e-10)


def test_merged_compressor_and_query_reasoner_encode_alike_and_training_still_reaches_the_adapter(clara):
    clara.to(torch.float64)
    memories, queries = clara.compress_documents(DOCUMENTS), clara.encode_queries(QUESTIONS)
    clara.merge_adapter("compressor")
    clara.merge_adapter("query_reasoner")
    assert set(clara.merged_adapters) == {"compressor", "query_reasoner"}
    torch.testing.assert_close(clara.compress_documents(DOCUMENTS), memories, rtol=0, atol=1e-10)
    torch.testing.assert_close(clara.encode_queries(QUESTIONS), queries, rtol=0, atol=1e-10)
    # With gradients the adapter itself runs, so training a merged model still trains the adapter.
    batch = clara.processor.tokenize_for_compression(DOCUMENTS[:2])
    hidden, _ = clara.memory_states(batch["input_ids"], batch["attention_mask"])
    hidden.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in clara.named_parameters() if "lora_B.compressor" in n)
    with pytest.raises(ValueError, match="Unknown adapter component 'retriever'"):
        clara.merge_adapter("retriever")


@pytest.mark.parametrize(
    "questions, documents, k, message",
    [
        (QUESTIONS, [DOCUMENTS], None, "2 questions but 1 document lists"),
        (QUESTIONS, [DOCUMENTS, []], None, "no candidate documents"),
        (QUESTIONS, [DOCUMENTS, DOCUMENTS[:1]], 2, "only 1 candidate"),
        (QUESTIONS[:1], DOCUMENTS[:1], None, "one list of candidate documents per question"),
        ([], [], None, "at least one question"),
        (QUESTIONS[:1], [["Paris", ""]], None, "Document 1 is empty"),
        (QUESTIONS, [DOCUMENTS, DOCUMENTS], 0, "k=0: the generator reads at least one document"),  # was: no document
        (QUESTIONS, [DOCUMENTS, DOCUMENTS], -1, "k=-1"),  # was: an internal RuntimeError
        (QUESTIONS, [DOCUMENTS, DOCUMENTS], 1.5, "k=1.5"),
    ],
)
def test_answer_bad_input_raises(clara, questions, documents, k, message):
    with pytest.raises(ValueError, match=message):
        clara.answer(questions, documents, k=k)


# ---------------------------------------------------------------- training forward


def _parameter_groups(model):
    names = model.adapter_names
    groups = {"base": [], "added_token_embeddings": [], **{component: [] for component in names}}
    for name, parameter in model.named_parameters():
        component = next((c for c, adapter in names.items() if f".{adapter}." in name), None)
        if component is not None:
            groups[component].append(parameter)
        elif name.startswith("added_token_embeddings"):
            groups["added_token_embeddings"].append(parameter)
        else:
            groups["base"].append(parameter)
    return groups


def _received_gradient(parameters):
    return [p.grad is not None and p.grad.abs().sum() > 0 for p in parameters]


def _document_batch(model, documents_per_row):
    rows = [model.processor.tokenize_for_compression(documents) for documents in documents_per_row]
    length = max(row["input_ids"].shape[1] for row in rows)
    pad = model.processor.tokenizer.pad_token_id
    input_ids = torch.stack([torch.nn.functional.pad(r["input_ids"], (length - r["input_ids"].shape[1], 0), value=pad) for r in rows])
    attention_mask = torch.stack([torch.nn.functional.pad(r["attention_mask"], (length - r["input_ids"].shape[1], 0)) for r in rows])
    return input_ids, attention_mask


def test_compression_training_forward_trains_compressor_generator_and_added_token_embeddings(clara):
    clara.train()
    clara.set_trainable_components(["compressor", "generator", "added_token_embeddings"])
    trainable_before = {n for n, p in clara.named_parameters() if p.requires_grad}
    document_ids, document_mask = _document_batch(clara, [DOCUMENTS[:2], DOCUMENTS[2:]])
    batch = clara.processor.tokenize_for_generation(QUESTIONS, 2, answers=["Paris", "Marie Curie"])
    output = clara(**batch, document_input_ids=document_ids, document_attention_mask=document_mask)
    torch.testing.assert_close(output.loss, output.lm_loss + 0.1 * output.mse_loss)
    assert output.retrieval_scores is None and output.selected_indices is None
    output.loss.backward()
    groups = _parameter_groups(clara)
    assert all(_received_gradient(groups["compressor"]))
    assert all(_received_gradient(groups["generator"]))
    assert all(_received_gradient(groups["added_token_embeddings"]))
    assert all(p.grad is None for p in groups["query_reasoner"] + groups["base"])
    assert {n for n, p in clara.named_parameters() if p.requires_grad} == trainable_before


def test_retrieval_training_forward_trains_query_reasoner_and_generator_only(clara):
    clara.train()
    clara.set_trainable_components(["query_reasoner", "generator"])
    document_ids, document_mask = _document_batch(clara, [DOCUMENTS[:3], DOCUMENTS[1:]])
    queries = clara.processor.tokenize_for_compression(QUESTIONS, "question")
    batch = clara.processor.tokenize_for_generation(QUESTIONS, 2, answers=["Paris", "Marie Curie"])
    output = clara(
        **batch,
        document_input_ids=document_ids,
        document_attention_mask=document_mask,
        query_input_ids=queries["input_ids"],
        query_attention_mask=queries["attention_mask"],
    )
    assert output.mse_loss is None
    torch.testing.assert_close(output.loss, output.lm_loss)
    assert output.retrieval_scores.shape == (2, 3)
    assert torch.equal(output.selected_indices, output.retrieval_scores.topk(2).indices)
    output.loss.backward()
    groups = _parameter_groups(clara)
    assert all(_received_gradient(groups["query_reasoner"]))
    assert all(_received_gradient(groups["generator"]))
    assert all(p.grad is None for p in groups["compressor"] + groups["base"] + groups["added_token_embeddings"])


def test_precomputed_document_memories_give_the_same_retrieval_loss(clara):
    clara.train()  # the frozen compressor must still run without dropout, exactly as when precomputed
    document_ids, document_mask = _document_batch(clara, [DOCUMENTS[:3], DOCUMENTS[1:]])
    queries = clara.processor.tokenize_for_compression(QUESTIONS, "question")
    batch = clara.processor.tokenize_for_generation(QUESTIONS, 2, answers=["Paris", "Marie Curie"])
    common = dict(**batch, query_input_ids=queries["input_ids"], query_attention_mask=queries["attention_mask"])
    torch.manual_seed(0)
    from_tokens = clara(**common, document_input_ids=document_ids, document_attention_mask=document_mask)
    clara.eval()
    memories = torch.stack([clara.compress_documents(DOCUMENTS[:3]), clara.compress_documents(DOCUMENTS[1:])])
    clara.train()
    torch.manual_seed(0)
    from_memories = clara(**common, document_memories=memories)
    torch.testing.assert_close(from_tokens.loss, from_memories.loss, atol=1e-5, rtol=1e-5)


def test_the_answers_logits_alone_give_the_same_loss_and_gradients(clara):
    model = clara.double().eval()  # float64: the two paths agree to rounding on any machine
    model.set_trainable_components(["compressor", "generator", "added_token_embeddings"])
    document_ids, document_mask = _document_batch(model, [DOCUMENTS[:2], DOCUMENTS[2:]])
    batch = model.processor.tokenize_for_generation(QUESTIONS, 2, answers=["Paris", "Marie Curie"])
    batch.update(document_input_ids=document_ids, document_attention_mask=document_mask)
    first_answer_token = int((batch["labels"] != -100).any(0).int().argmax())
    keep = batch["labels"].shape[1] - first_answer_token + 1  # from the position that predicts it
    assert keep < batch["labels"].shape[1] - 10
    outputs, gradients = [], []
    for logits_to_keep in (0, keep):
        model.zero_grad()
        output = model(**batch, logits_to_keep=logits_to_keep)
        output.loss.backward()
        outputs.append(output)
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    full, kept = outputs
    assert kept.logits.shape == (2, keep, full.logits.shape[-1])
    torch.testing.assert_close(kept.logits, full.logits[:, -keep:], rtol=0, atol=1e-12)
    torch.testing.assert_close(kept.loss, full.loss, rtol=0, atol=1e-12)
    assert gradients[0].keys() == gradients[1].keys() and gradients[0]
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="logits_to_keep=.* drops them"):
        model(**batch, logits_to_keep=keep - 1)
    with pytest.raises(ValueError, match="between 1 and the"):
        model(**batch, logits_to_keep=batch["labels"].shape[1] + 1)


def test_forward_bad_input_raises(clara):
    batch = clara.processor.tokenize_for_generation(QUESTIONS, 1, answers=["Paris", "Marie Curie"])
    document_ids, document_mask = _document_batch(clara, [DOCUMENTS[:1], DOCUMENTS[1:2]])
    with pytest.raises(ValueError, match="exactly one"):
        clara(**batch)
    with pytest.raises(ValueError, match="\\[B, N, L\\]"):
        clara(**batch, document_input_ids=document_ids[:, 0], document_attention_mask=document_mask[:, 0])
    with pytest.raises(ValueError, match="left-padded"):
        clara(**batch, document_input_ids=document_ids.flip(-1), document_attention_mask=document_mask.flip(-1))
    with pytest.raises(ValueError, match="Unknown component"):
        clara.set_trainable_components(["decoder"])


@pytest.mark.parametrize("stage", ["compression (stages 1 and 2)", "retrieval (stage 3)"])
def test_gradient_checkpointing_gives_every_adapter_the_gradients_it_gets_without(clara, stage):
    # One backward pass runs through two adapters' recomputed layers; each must recompute with its own adapter.
    model = randomize_adapters(clara).double().train()  # float64: equal to rounding on any machine
    retrieval = stage.startswith("retrieval")
    components = ["query_reasoner", "generator"] if retrieval else ["compressor", "generator", "added_token_embeddings"]
    model.set_trainable_components(components)
    document_ids, document_mask = _document_batch(model, [DOCUMENTS[:3], DOCUMENTS[1:]])
    batch = model.processor.tokenize_for_generation(QUESTIONS, 2 if retrieval else 3, answers=["Paris", "Marie Curie"])
    batch.update(document_input_ids=document_ids, document_attention_mask=document_mask)
    if retrieval:
        queries = model.processor.tokenize_for_compression(QUESTIONS, "question")
        batch.update(query_input_ids=queries["input_ids"], query_attention_mask=queries["attention_mask"])
    gradients = []
    for checkpointing in (False, True):
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()  # 5.23's name
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks: the recomputation replays the forward pass's
        loss = model(**batch).loss
        adapter_state = [(layer._disable_adapters, layer._active_adapter) for layer in model._lora_layers]
        loss.backward()
        assert [(layer._disable_adapters, layer._active_adapter) for layer in model._lora_layers] == adapter_state
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    without, with_checkpointing = gradients
    groups = _parameter_groups(model)
    assert all(all(_received_gradient(groups[component])) for component in components)
    assert with_checkpointing.keys() == without.keys()
    for name, gradient in without.items():
        torch.testing.assert_close(with_checkpointing[name], gradient, rtol=1e-9, atol=1e-12, msg=name)


MISTRAL_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def test_templates_without_a_system_role_get_it_in_the_user_turn(clara):
    clara.processor.tokenizer.chat_template = MISTRAL_LIKE_TEMPLATE
    batch = clara.processor.tokenize_for_generation(QUESTIONS[:1], 2, answers=["Paris"])
    text = clara.processor.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<s>[INST] " + clara.processor.system_prompt + "\n\nBackground:\n")
    assert text.endswith("[/INST]Paris<|im_end|>")
    assert int(torch.isin(batch["input_ids"], torch.tensor(clara.config.memory_token_ids)).sum()) == 8

package org.snowflock;

/**
 * What {@link SnowFlock#checkpointParent()} returns: in the parent now, and in each clone
 * that {@link SnowFlock#createClones(String, Ticket)} makes from it later.
 *
 * @param name the checkpoint's ID, for createClones
 * @param id 0 in the parent, the clone's ID (1..granted) in a clone
 */
public record Checkpoint(String name, int id) {}
